"""LagKV on vLLM's CPU attention (the platform always picks CPU_ATTN, so the plugin overrides
that registry entry with this subclass; models without LagKV settings behave as stock)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from lrsa_serve import lagkv
from lrsa_serve.engine import stats
from lrsa_serve.engine.backend import LagKVBuilderMixin, LagKVImplMixin, lagkv_backend
from lrsa_serve.engine.compaction import CompactionPlan
from lrsa_serve.engine.cpu_layout import PageOrder, page_orders


@dataclass
class LagKVCPUMetadata(CPUAttentionMetadata):
    compaction: CompactionPlan | None = None


class LagKVCPUBuilder(LagKVBuilderMixin, CPUAttentionMetadataBuilder):
    metadata_cls = LagKVCPUMetadata


class LagKVCPUImpl(LagKVImplMixin, CPUAttentionBackendImpl):
    """Compacts each layer as its attention finishes, timed per layer."""

    def compact(self, layer, kv_cache: torch.Tensor, attn_metadata, plan: CompactionPlan) -> None:
        if not plan.launch:  # the host saw no request complete a partition this step
            return
        plan = plan.active_rows
        if plan.part_blocks.shape[0] == 0:
            return
        with stats.COMPACTION_SECONDS.time():  # wall time, per layer
            orders = page_orders(layer.isa, kv_cache.dtype, kv_cache.shape[2], self.head_size)
            compact_cpu_pages(kv_cache, plan, orders)


def compact_cpu_pages(
    kv_cache: torch.Tensor, plan: CompactionPlan, orders: tuple[PageOrder, PageOrder]
) -> None:
    """Score and compact one layer's planned partitions in vLLM's CPU cache layout.

    ``kv_cache``: ``[blocks, heads, block_size, 2 * head_dim]``; each (block, head) page holds its
    K half then its V half, each in the ISA's element order (``orders``). The partitions and their
    references are copied once into logical rows, selected with ``lagkv.select_partition`` and the
    kept rows written back into the partition's first blocks (sources are copies: no overlap).
    """
    blocks, heads, block_size, _ = kv_cache.shape
    halves = kv_cache.view(blocks, heads, 2 * block_size, -1).chunk(2, 2)
    requests = plan.part_blocks.shape[0]
    lag, keep = plan.rule.lag, plan.rule.keep
    involved = torch.cat([plan.part_blocks, plan.ref_blocks], dim=1).long()
    rows = []
    for half, order in zip(halves, orders, strict=True):
        pages = order.to_logical(half.flatten(2)[involved])  # [R, 2 * cols, heads, block, dim]
        rows.append(pages.transpose(1, 2).reshape(requests, heads, 2 * lag, -1))
    part, ref = [x[:, :, :lag] for x in rows], [x[:, :, lag:] for x in rows]  # K, V of each
    kept = lagkv.select_partition(*part, *ref, keep, plan.rule.score_v_ratio)
    dst = plan.part_blocks[:, : keep // block_size].long()
    for half, order, x in zip(halves, orders, rows, strict=True):
        moved = x.gather(2, kept[..., None].expand(-1, -1, -1, x.shape[-1]))
        moved = moved.unflatten(2, (-1, block_size)).transpose(1, 2)  # [R, kept cols, heads, ...]
        half.flatten(2)[dst] = order.to_physical(moved)


LagKVCPUBackend = lagkv_backend(
    "LagKVCPUBackend", CPUAttentionBackend, LagKVCPUImpl, LagKVCPUBuilder
)
