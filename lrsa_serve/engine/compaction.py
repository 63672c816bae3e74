"""One layer's compaction step, free of vLLM imports so kernels and tests can drive it directly
on a synthetic paged cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrsa_serve.config import LagKVConfig
from lrsa_serve.kernels import compress_partitions


@dataclass
class CompactionPlan:
    """Partitions to compress after this step's attention, one row per (request, partition).
    With ``active``, rows whose entry is 0 compress nothing (decided on the device)."""

    part_blocks: torch.Tensor  # [rows, lag / block_size] physical blocks of partition p
    ref_blocks: torch.Tensor  # [rows, lag / block_size] physical blocks of partition p+1
    settings: LagKVConfig
    active: torch.Tensor | None = None  # [rows] int32, on the cache's device
    # False when the host knows no row is active (an eager step launches nothing).
    launch: bool = True


def run_compaction(
    plan: CompactionPlan, key_cache: torch.Tensor, value_cache: torch.Tensor
) -> None:
    """Score and compact the planned partitions of one layer, on row-major
    ``[blocks, heads, block, dim]`` views of its cache. Asynchronous on CUDA."""
    compress_partitions(
        key_cache,
        value_cache,
        plan.part_blocks,
        plan.ref_blocks,
        plan.settings.keep,
        plan.settings.score_v_ratio,
        active=plan.active,
    )  # Triton on CUDA, plain torch on the CPU
