"""LagKV on vLLM's CUDA attention backends: FlashAttention (``LAGKV_FLASH_ATTN``: FA3 on
Hopper, FA2 elsewhere) by default, vLLM's Triton attention (``LAGKV_TRITON``) where
FlashAttention cannot run (float32, or no FlashAttention in the vLLM build).

Both are the stock backend with ``backend.py``'s builder and impl: the compacted view in
persistent buffers rewritten on the GPU each step (``device_view``, so full CUDA graphs replay
LagKV steps), and after the group's last layer every layer's compaction in one set of launches
(``compaction.GroupCompaction``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)

from lrsa_serve.engine.backend import LagKVBuilderMixin, LagKVImplMixin, lagkv_backend
from lrsa_serve.engine.compaction import CompactionPlan, GroupCompaction

FLASH_BACKEND = "LAGKV_FLASH_ATTN"
TRITON_BACKEND = "LAGKV_TRITON"


def choose_backend(dtype: object) -> tuple[str, str]:
    """The LagKV CUDA backend for a model dtype (as given to vLLM) and why."""
    if str(dtype).removeprefix("torch.") in ("float32", "float"):
        return TRITON_BACKEND, "FlashAttention takes fp16/bf16 only; float32 runs on Triton"
    try:
        from vllm.v1.attention.backends.fa_utils import is_flash_attn_varlen_func_available

        available = is_flash_attn_varlen_func_available()
    except ImportError:
        available = False
    if not available:
        return TRITON_BACKEND, "this vLLM build has no FlashAttention"
    return FLASH_BACKEND, "FlashAttention (FA3 on Hopper, FA2 elsewhere)"


class LagKVCudaBuilderMixin(LagKVBuilderMixin):
    """The plan also carries the group's ``GroupCompaction``, which the impls report to."""

    group: GroupCompaction | None = None

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if self.geometry is not None:
            self.group = GroupCompaction(layer_names, kv_cache_spec.head_size)

    def metadata_fields(self, plan: CompactionPlan) -> dict[str, Any]:
        return {"compaction": plan, "compaction_group": self.group}


class LagKVCudaImplMixin(LagKVImplMixin):
    """Each layer reports to its group's compaction, which runs once every layer of the group
    has (``GroupCompaction``)."""

    def compact(self, layer, kv_cache: torch.Tensor, attn_metadata, plan: CompactionPlan) -> None:
        attn_metadata.compaction_group.after_layer(layer.layer_name, kv_cache, plan)


@dataclass
class LagKVFlashMetadata(FlashAttentionMetadata):
    compaction: CompactionPlan | None = None
    compaction_group: GroupCompaction | None = None


class LagKVFlashBuilder(LagKVCudaBuilderMixin, FlashAttentionMetadataBuilder):
    metadata_cls = LagKVFlashMetadata


class LagKVFlashImpl(LagKVCudaImplMixin, FlashAttentionImpl):
    pass


LagKVFlashBackend = lagkv_backend(
    "LagKVFlashBackend", FlashAttentionBackend, LagKVFlashImpl, LagKVFlashBuilder, FLASH_BACKEND
)


@dataclass
class LagKVTritonMetadata(TritonAttentionMetadata):
    compaction: CompactionPlan | None = None
    compaction_group: GroupCompaction | None = None


class LagKVTritonBuilder(LagKVCudaBuilderMixin, TritonAttentionMetadataBuilder):
    metadata_cls = LagKVTritonMetadata


class LagKVTritonImpl(LagKVCudaImplMixin, TritonAttentionImpl):
    pass


LagKVTritonBackend = lagkv_backend(
    "LagKVTritonBackend",
    TritonAttentionBackend,
    LagKVTritonImpl,
    LagKVTritonBuilder,
    TRITON_BACKEND,
)
