"""``vllm.general_plugins`` entry point, loaded by vLLM in every process it starts.

Registers the LagKV KV-cache spec with its manager and the LagKV attention backend. Both act only
for models with LagKV settings (checkpoint ``"lagkv"`` or ``additional_config``); everything else
runs exactly as stock vLLM.
"""

from __future__ import annotations

import pickle
from typing import Any

# The LagKV CUDA backends by name -> class (vLLM's attention_backend picks one of them).
CUDA_BACKENDS = {
    "LAGKV_FLASH_ATTN": "lrsa_serve.engine.cuda_backend.LagKVFlashBackend",
    "LAGKV_TRITON": "lrsa_serve.engine.cuda_backend.LagKVTritonBackend",
}
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from lrsa_serve.engine.kv_spec import LagKVAttentionSpec, LagKVManager

    # Built-ins first: the registry skips its own registration once it holds any entry.
    register_all_kvcache_specs(None)
    KVCacheSpecRegistry.register(
        LagKVAttentionSpec, LagKVManager, uniform_type_base_spec=FullAttentionSpec
    )
    if current_platform.is_cpu():
        # The CPU platform always picks CPU_ATTN, so LagKV overrides that entry.
        register_backend(
            AttentionBackendEnum.CPU_ATTN, "lrsa_serve.engine.cpu_backend.LagKVCPUBackend"
        )
    elif current_platform.is_cuda_alike():
        register_cuda_backends()
    _registered = True


def register_cuda_backends() -> None:
    """Adds the LagKV CUDA backends to vLLM's backend enum, and makes them picklable into a fresh
    process. The members are dynamic, and an enum member pickles by value: a process that vLLM
    spawns (its worker, its engine core; spawned whenever the parent has initialised CUDA)
    unpickles the engine config before it loads any plugin, so the value would be unknown there.
    The member pickles instead as a call to ``backend_member``, which registers it first."""
    import copyreg

    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    for name in CUDA_BACKENDS:
        backend_member(name)
    copyreg.pickle(AttentionBackendEnum, _reduce_backend)


def backend_member(name: str) -> Any:
    """The LagKV backend member ``name`` of vLLM's backend enum, registered if it is not yet."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if name not in AttentionBackendEnum.__members__:
        register_backend(name, CUDA_BACKENDS[name])
    return AttentionBackendEnum[name]


def _reduce_backend(member: Any) -> tuple:
    if member.name in CUDA_BACKENDS:
        return backend_member, (member.name,)
    return member.__reduce_ex__(pickle.DEFAULT_PROTOCOL)  # stock members: the enum's own way
