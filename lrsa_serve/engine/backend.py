"""What every LagKV attention backend adds to vLLM's stock one, whatever the device.

Per step (the metadata builder, once per KV-cache group):
- reads the compacted cache: block-table columns of evicted blocks are dropped and each request's
  length shrinks by its evicted tokens. RoPE positions and the slot mapping stay logical, so new
  tokens are written at their true place and attend with their true positions;
- plans compaction: the requests whose tokens complete partition p+1 in this step get partition p
  scored against p+1 and compacted.
Per layer (the impl): the stock forward, then the planned compaction, so this step's tokens still
see partition p whole and the next step sees only its kept rows.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

from lrsa_serve.config import LagKVConfigError
from lrsa_serve.engine import settings as engine_settings
from lrsa_serve.engine import stats
from lrsa_serve.engine.compaction import CompactionPlan
from lrsa_serve.engine.device_view import DeviceView, host_view
from lrsa_serve.engine.kv_spec import LagKVAttentionSpec
from lrsa_serve.engine.layout import BlockGeometry
from lrsa_serve.engine.settings import SCHEDULER


def lagkv_backend(
    class_name: str, base: type, impl: type, builder: type, name: str | None = None
) -> type:
    """The stock backend ``base`` with LagKV's impl and metadata builder, reporting LagKV's KV
    spec for models with settings. ``name``: the name vLLM selects it by (None keeps the stock
    one, as on the CPU, where the platform always picks ``CPU_ATTN``). ``class_name`` is the
    module-level name it is bound to: vLLM's registry imports backends by qualified path."""

    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        # Full attention becomes LagKV when this process's model has settings; anything else
        # (sliding window, models without settings) stays stock.
        spec = super(backend, cls).customize_spec(spec)
        settings = engine_settings.remembered()
        if settings is None or type(spec) is not FullAttentionSpec:
            return spec
        return LagKVAttentionSpec.wrap(spec, settings)

    attrs = {
        "__module__": builder.__module__,  # where it is bound, beside its builder
        "get_impl_cls": staticmethod(lambda: impl),
        "get_builder_cls": staticmethod(lambda: builder),
        "customize_spec": classmethod(customize_spec),
    }
    if name is not None:
        attrs["get_name"] = staticmethod(lambda: name)
    backend = type(class_name, (base,), attrs)
    return backend


class LagKVBuilderMixin:
    """Hands the stock builder the step's compacted view (``DeviceView``: persistent buffers, one
    Triton launch on CUDA, its torch reference on the CPU) and returns the stock metadata as
    ``metadata_cls``, carrying the step's compaction plan (``metadata_fields``)."""

    geometry: BlockGeometry | None = None
    view: DeviceView | None = None
    metadata_cls: type
    # vLLM may reuse another group's metadata with only the block table swapped; the compacted
    # view is per group, so every group builds its own.
    supports_update_block_table = False

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if not isinstance(kv_cache_spec, LagKVAttentionSpec):
            return
        scheduler = vllm_config.scheduler_config.scheduler_cls
        if scheduler != SCHEDULER:
            # Without aligned chunks a long prompt would fail mid-request; refuse at start-up.
            raise LagKVConfigError(
                "this model has LagKV settings, which need lrsa-serve's scheduler: start it with "
                f"`lrsa serve` / make_llm, or pass --scheduler-cls {SCHEDULER}"
            )
        self.geometry = kv_cache_spec.geometry
        self.view = DeviceView(self.geometry, vllm_config.scheduler_config.max_num_seqs, device)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        view, plan = self.lagkv_view(common_attn_metadata)
        meta = super().build(common_prefix_len, view, fast_build)
        if plan is None:
            return meta
        return with_fields(meta, self.metadata_cls, self.metadata_fields(plan))

    def metadata_fields(self, plan: CompactionPlan) -> dict[str, Any]:
        return {"compaction": plan}

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
                    host.compressing, host.compressing * self.geometry.rule.evicted
                )
        return cm.replace(**replaced), self.view.plan(table.shape[0], host)


def with_fields(meta, lagkv_cls: type, extra: dict[str, Any]):
    """The stock metadata as its LagKV subclass (which only adds fields) with ``extra`` set:
    the built object's state as it is, attributes set outside its fields included. Once per
    step and group, so no constructor (``__post_init__`` already ran on ``meta``)."""
    lagkv = object.__new__(lagkv_cls)
    vars(lagkv).update(vars(meta))
    vars(lagkv).update(extra)
    return lagkv


class LagKVImplMixin:
    """The stock impl's forward, then this layer's part of the step's planned compaction (after
    attention: this step's tokens still see the partition whole)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = get_current_vllm_config_or_none()  # current while vLLM builds the layers
        if config is not None:
            engine_settings.remember(engine_settings.settings_from_vllm_config(config))

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        result = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs
        )
        plan = getattr(attn_metadata, "compaction", None)
        if plan is not None:
            self.compact(layer, kv_cache, attn_metadata, plan)
        return result

    def compact(self, layer, kv_cache: torch.Tensor, attn_metadata, plan: CompactionPlan) -> None:
        raise NotImplementedError
