"""LagKV on vLLM's CUDA attention backends: FlashAttention (``LAGKV_FLASH_ATTN``: FA3 on
Hopper, FA2 elsewhere) by default, vLLM's Triton attention (``LAGKV_TRITON``) where
FlashAttention cannot run (float32, or no FlashAttention in the vLLM build).

Both are the stock backend with two additions:
- the metadata builder hands the stock one the compacted view (``device_view``): persistent
  buffers rewritten on the GPU each step, so vLLM's full CUDA graphs capture and replay LagKV
  decode steps like any other;
- after the stock forward of the group's last layer, every layer's compaction in one set of
  Triton select/compact launches (``compaction.GroupCompaction``) over every request row,
  inactive rows skipped on the device. Captured graphs contain these launches; eager and
  piecewise steps launch them only when the host sees a request complete a partition.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

from vllm.v1.attention.backend import CommonAttentionMetadata
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

from lrsa_serve.engine import stats
from lrsa_serve.engine.backend import (
    LagKVBuilderMixin,
    lagkv_backend,
    remember_current_settings,
)
from lrsa_serve.engine.compaction import CompactionPlan, GroupCompaction
from lrsa_serve.engine.device_view import DeviceView, host_view

logger = logging.getLogger("lrsa_serve.engine")

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
    """Compacted view and plan from persistent device buffers (see ``device_view``), handed to
    the stock builder; its metadata comes back as ``metadata_cls`` carrying the plan and the
    group's ``GroupCompaction``."""

    view: DeviceView | None = None
    group: GroupCompaction | None = None
    metadata_cls: type
    # vLLM may reuse another group's metadata with only the block table swapped; the compacted
    # view is per group, so every group builds its own.
    supports_update_block_table = False

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.init_lagkv(kv_cache_spec, vllm_config)
        if self.geometry is not None:
            max_reqs = vllm_config.scheduler_config.max_num_seqs
            self.view = DeviceView(self.geometry, max_reqs, device)
            self.group = GroupCompaction(layer_names, kv_cache_spec.head_size)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        view, plan = self.lagkv_view(common_attn_metadata)
        meta = super().build(common_prefix_len, view, fast_build)
        if plan is None:
            return meta
        return with_compaction(meta, self.metadata_cls, plan, self.group)

    def lagkv_view(
        self, cm: CommonAttentionMetadata
    ) -> tuple[CommonAttentionMetadata, CompactionPlan | None]:
        if self.view is None:
            return cm, None
        assert self.geometry is not None
        host = host_view(
            self.geometry, cm.seq_lens_cpu_upper_bound, cm.query_start_loc_cpu, cm.num_reqs,
            cm.max_seq_len,
        )  # fmt: skip
        table, seq_lens = self.view.update(
            cm.block_table_tensor, cm.seq_lens, cm.query_start_loc, cm.num_reqs
        )
        replaced = {"block_table_tensor": table, "seq_lens": seq_lens}
        if host is not None:
            replaced |= {"max_seq_len": host.max_seq_len,
                         "seq_lens_cpu_upper_bound": host.upper_bound}  # fmt: skip
            if host.compressing:
                stats.record_compactions(
                    host.compressing, host.compressing * self.geometry.evicted_per_partition
                )
        return cm.replace(**replaced), self.view.plan(table.shape[0], host)


class LagKVCudaImplMixin:
    """The stock impl's forward, then this layer reports to its group's compaction, which runs
    once every layer of the group has (``GroupCompaction``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        remember_current_settings()

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        result = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs
        )
        plan = getattr(attn_metadata, "compaction", None)
        if plan is not None:
            attn_metadata.compaction_group.after_layer(layer.layer_name, kv_cache, plan)
        return result


def with_compaction(meta, lagkv_cls: type, plan: CompactionPlan, group: GroupCompaction):
    """The stock metadata as its LagKV subclass carrying the plan and the group's compaction
    (attributes the stock build sets outside its dataclass fields come along)."""
    values = {f.name: getattr(meta, f.name) for f in fields(meta) if f.init}
    lagkv = lagkv_cls(**values, compaction=plan, compaction_group=group)
    vars(lagkv).update({k: v for k, v in vars(meta).items() if k not in values})
    return lagkv


# ---- FlashAttention --------------------------------------------------------------------------
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


# ---- Triton ----------------------------------------------------------------------------------
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
