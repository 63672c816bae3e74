"""LagKV on vLLM's Triton attention (CUDA), registered under its own name (``LAGKV_TRITON``) and
selected with ``attention_backend``; compaction runs the Triton kernels of ``lrsa_serve.kernels``.

Full CUDA graphs would capture the block table and lengths by address, while LagKV rewrites them
every step: this builder declares no full-graph support, so vLLM keeps attention (and with it
compaction) outside captured regions (piecewise graphs).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)

from lrsa_serve.engine import stats
from lrsa_serve.engine.backend import (
    LagKVBuilderMixin,
    lagkv_spec,
    remember_current_settings,
)
from lrsa_serve.engine.compaction import CompactionPlan, run_compaction


@dataclass
class LagKVTritonMetadata(TritonAttentionMetadata):
    compaction: CompactionPlan | None = None


class LagKVTritonBuilder(LagKVBuilderMixin, TritonAttentionMetadataBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.init_lagkv(kv_cache_spec, vllm_config)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        view, plan = self.compacted_view(common_attn_metadata)
        meta = super().build(common_prefix_len, view, fast_build)
        if self.geometry is None:
            return meta
        return LagKVTritonMetadata(
            **{f.name: getattr(meta, f.name) for f in fields(TritonAttentionMetadata)},
            compaction=plan,
        )


class LagKVTritonImpl(TritonAttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        remember_current_settings()

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        result = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs
        )
        plan = getattr(attn_metadata, "compaction", None)
        if plan is not None:
            # Logical layout [blocks, kv_heads, block, 2*head]: K|V packed in the last dim.
            with stats.time_compaction():
                run_compaction(
                    plan, kv_cache[..., : self.head_size], kv_cache[..., self.head_size :]
                )
        return result


class LagKVTritonBackend(TritonAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "LAGKV_TRITON"

    @staticmethod
    def get_impl_cls() -> type[TritonAttentionImpl]:
        return LagKVTritonImpl

    @staticmethod
    def get_builder_cls() -> type[TritonAttentionMetadataBuilder]:
        return LagKVTritonBuilder

    @classmethod
    def customize_spec(cls, spec):
        return lagkv_spec(super().customize_spec(spec))
