"""The CUDA backend's compaction step (``engine.compaction.GroupCompaction``: every layer of a
step at once) on synthetic paged caches in vLLM's layout ([blocks, kv_heads, block, 2*head], K|V
packed), one tensor per layer as vLLM allocates them, against the contiguous reference. On CPU it
runs the torch path; with CUDA, the Triton kernels."""

from __future__ import annotations

import pytest
import torch

from lrsa_serve import lagkv
from lrsa_serve.config import LagKVConfig
from lrsa_serve.engine.compaction import CompactionPlan, GroupCompaction
from lrsa_serve.kernels import naive

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def synthetic(device, requests, heads, dim, block, lag, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    per_part = lag // block
    num_blocks = requests * 2 * per_part + 7
    kv = torch.randn(num_blocks, heads, block, 2 * dim, generator=gen).to(dtype).to(device)
    table = torch.randperm(num_blocks, generator=gen)[: requests * 2 * per_part]
    table = table.view(requests, 2 * per_part).to(device=device, dtype=torch.int32)
    return kv, table[:, :per_part], table[:, per_part:]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "requests, heads, dim, lag, dtype",
    [(3, 2, 64, 64, torch.float32), (5, 4, 128, 128, torch.bfloat16)],
)
def test_compaction_step_on_packed_caches(device, requests, heads, dim, lag, dtype):
    block, cfg = 16, LagKVConfig(sink=16, lag=lag, ratio=0.25)
    layers = [
        synthetic(device, requests, heads, dim, block, lag, dtype, seed=lag + heads)[0]
        for _ in range(3)
    ]
    layers = [kv + i for i, kv in enumerate(layers)]  # different contents per layer
    _, part, ref = synthetic(device, requests, heads, dim, block, lag, dtype, seed=lag + heads)
    befores = [kv.clone() for kv in layers]
    group = GroupCompaction([f"layer.{i}" for i in range(len(layers))], head_size=dim)
    plan = CompactionPlan(part, ref, cfg.rule)
    for i, kv in enumerate(layers):
        group.after_layer(f"layer.{i}", kv, plan)
    for kv, before in zip(layers, befores, strict=True):
        assert_compacted(kv, before, part, ref, cfg, dim, block)


def assert_compacted(kv, before, part, ref, cfg, dim, block) -> None:
    """Contiguous reference, computed on CPU in float32 scores."""
    cpu = before.cpu()
    keys, values = (
        naive.gather_rows(cpu[..., :dim], part.cpu()),
        naive.gather_rows(cpu[..., dim:], part.cpu()),
    )
    ref_k, ref_v = (
        naive.gather_rows(cpu[..., :dim], ref.cpu()),
        naive.gather_rows(cpu[..., dim:], ref.cpu()),
    )
    kept = lagkv.select_partition(keys, values, ref_k, ref_v, cfg.keep)
    idx = kept[..., None].expand(-1, -1, -1, dim)
    after = kv.cpu()
    moved_k = naive.gather_rows(after[..., :dim], part.cpu())[:, :, : cfg.keep]
    moved_v = naive.gather_rows(after[..., dim:], part.cpu())[:, :, : cfg.keep]
    assert torch.equal(moved_k, keys.gather(2, idx)) and torch.equal(moved_v, values.gather(2, idx))
    untouched = torch.ones(kv.shape[0], dtype=torch.bool)
    untouched[part[:, : cfg.keep // block].flatten().long().cpu()] = False
    assert torch.equal(after[untouched], cpu[untouched])
