"""LagKV on vLLM's CPU attention (the platform always picks CPU_ATTN, so the plugin overrides
that registry entry with this subclass; models without LagKV settings behave as stock)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from lrsa_serve.engine import stats
from lrsa_serve.engine.backend import (
    LagKVBuilderMixin,
    lagkv_spec,
    remember_current_settings,
)
from lrsa_serve.engine.compaction import CompactionPlan, run_compaction
from lrsa_serve.engine.cpu_layout import page_orders


@dataclass
class LagKVCPUMetadata(CPUAttentionMetadata):
    compaction: CompactionPlan | None = None


class LagKVCPUBuilder(LagKVBuilderMixin, CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.init_lagkv(kv_cache_spec, vllm_config)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        view, plan = self.compacted_view(common_attn_metadata)
        meta = super().build(common_prefix_len, view, fast_build)
        if self.geometry is None:
            return meta
        return LagKVCPUMetadata(
            **{f.name: getattr(meta, f.name) for f in fields(CPUAttentionMetadata)},
            compaction=plan,
        )


class LagKVCPUImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        remember_current_settings()

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        result = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs
        )
        plan = getattr(attn_metadata, "compaction", None)
        if plan is not None:
            with stats.time_compaction():
                self._compact(layer, kv_cache, plan)
        return result

    def _compact(self, layer, kv_cache: torch.Tensor, plan: CompactionPlan) -> None:
        blocks, heads, block_size, _ = kv_cache.shape
        # Same split as the stock impl: each (block, head) page holds its K half then its V half,
        # each in the ISA's own element order.
        key_half, value_half = kv_cache.view(blocks, heads, 2 * block_size, -1).chunk(2, 2)
        key_pages, value_pages = key_half.flatten(2), value_half.flatten(2)
        key_order, value_order = page_orders(layer.isa, kv_cache.dtype, block_size, self.head_size)
        # Copy the involved blocks into logical row order, compact there, write the kept back.
        involved = torch.cat([plan.part_blocks, plan.ref_blocks], dim=1).long()
        keys = key_order.to_logical(key_pages[involved.flatten()], block_size)
        values = value_order.to_logical(value_pages[involved.flatten()], block_size)
        local = torch.arange(involved.numel()).view_as(involved)
        part_local = local[:, : plan.part_blocks.shape[1]]
        ref_local = local[:, plan.part_blocks.shape[1] :]
        run_compaction(replace(plan, part_blocks=part_local, ref_blocks=ref_local), keys, values)
        kept_blocks = plan.settings.keep // block_size
        src = part_local[:, :kept_blocks].flatten()
        dst = plan.part_blocks[:, :kept_blocks].flatten().long()
        key_pages[dst] = key_order.to_physical(keys[src])
        value_pages[dst] = value_order.to_physical(values[src])


class LagKVCPUBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[CPUAttentionBackendImpl]:
        return LagKVCPUImpl

    @staticmethod
    def get_builder_cls() -> type[CPUAttentionMetadataBuilder]:
        return LagKVCPUBuilder

    @classmethod
    def customize_spec(cls, spec):
        return lagkv_spec(super().customize_spec(spec))
