"""One layer's compaction step, free of vLLM imports so the GPU machine (no vLLM) can drive it
directly on a synthetic paged cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrsa_serve.config import LagKVConfig
from lrsa_serve.kernels import naive


@dataclass
class CompactionPlan:
    """Partitions to compress after this step's attention, one row per (request, partition)."""

    part_blocks: torch.Tensor  # [rows, lag / block_size] physical blocks of partition p
    ref_blocks: torch.Tensor  # [rows, lag / block_size] physical blocks of partition p+1
    settings: LagKVConfig


def run_compaction(
    plan: CompactionPlan, key_cache: torch.Tensor, value_cache: torch.Tensor
) -> None:
    """Score and compact the planned partitions of one layer, on row-major
    ``[blocks, heads, block, dim]`` views of its cache."""
    args = (plan.part_blocks, plan.ref_blocks, plan.settings.keep, plan.settings.score_v_ratio)
    if key_cache.is_cuda:
        from lrsa_serve.kernels import compress_partitions  # Triton

        compress_partitions(key_cache, value_cache, *args)
        torch.cuda.synchronize(key_cache.device)
    else:
        kept = naive.select_kept(key_cache, value_cache, *args)
        naive.compact_kept(key_cache, value_cache, plan.part_blocks, kept)
