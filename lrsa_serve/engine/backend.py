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

import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

from lrsa_serve.config import LagKVConfigError
from lrsa_serve.engine import settings as engine_settings
from lrsa_serve.engine import stats
from lrsa_serve.engine.compaction import CompactionPlan
from lrsa_serve.engine.kv_spec import LagKVAttentionSpec
from lrsa_serve.engine.layout import BlockGeometry
from lrsa_serve.engine.settings import SCHEDULER


def lagkv_spec(spec: AttentionSpec) -> AttentionSpec:
    """The spec a LagKV backend reports: full attention becomes LagKV when this process's model
    has settings; anything else (sliding window, models without settings) stays stock."""
    settings = engine_settings.remembered()
    if settings is None or type(spec) is not FullAttentionSpec:
        return spec
    return LagKVAttentionSpec.wrap(spec, settings)


def lagkv_backend(
    class_name: str, base: type, impl: type, builder: type, name: str | None = None
) -> type:
    """The stock backend ``base`` with LagKV's impl and metadata builder, reporting LagKV's KV
    spec for models with settings. ``name``: the name vLLM selects it by (None keeps the stock
    one, as on the CPU, where the platform always picks ``CPU_ATTN``). ``class_name`` is the
    module-level name it is bound to: vLLM's registry imports backends by qualified path."""

    def customize_spec(cls, spec):
        return lagkv_spec(super(backend, cls).customize_spec(spec))

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


def remember_current_settings() -> None:
    """Called while vLLM builds the model's attention layers, when its config is current."""
    config = get_current_vllm_config_or_none()
    if config is not None:
        engine_settings.remember(engine_settings.settings_from_vllm_config(config))


class LagKVBuilderMixin:
    """Rewrites the common metadata into the compacted view and plans compaction."""

    geometry: BlockGeometry | None = None

    def init_lagkv(self, kv_cache_spec: AttentionSpec, vllm_config) -> None:
        self.geometry = (
            kv_cache_spec.geometry if isinstance(kv_cache_spec, LagKVAttentionSpec) else None
        )
        scheduler = vllm_config.scheduler_config.scheduler_cls
        if self.geometry is not None and scheduler != SCHEDULER:
            # Without aligned chunks a long prompt would fail mid-request; refuse at start-up.
            raise LagKVConfigError(
                "this model has LagKV settings, which need lrsa-serve's scheduler: start it with "
                f"`lrsa serve` / make_llm, or pass --scheduler-cls {SCHEDULER}"
            )

    def compacted_view(
        self, cm: CommonAttentionMetadata
    ) -> tuple[CommonAttentionMetadata, CompactionPlan | None]:
        geometry = self.geometry
        if geometry is None:
            return cm, None
        n = cm.num_reqs
        starts = cm.query_start_loc_cpu[: n + 1].long()
        query_lens = starts[1:] - starts[:-1]
        seq_cpu = cm.seq_lens_cpu_upper_bound
        seq_lens = (seq_cpu if seq_cpu is not None else cm.seq_lens.cpu())[:n].long()
        before = geometry.compressed_before(seq_lens, query_lens)
        after = geometry.compressed(seq_lens)
        plan = self.plan(cm, before, after)
        if not bool(before.any()):
            return cm, plan
        evicted = before * geometry.evicted_per_partition
        table = cm.block_table_tensor
        live = geometry.live_columns(table.shape[1], before.to(table.device))
        compact_table = table.clone()
        compact_table[:n] = table[:n].gather(1, live.to(table.dtype))
        compact_seq = cm.seq_lens.clone()
        compact_seq[:n] -= evicted.to(compact_seq.device, compact_seq.dtype)
        physical = seq_lens - evicted
        replaced = {
            "block_table_tensor": compact_table,
            "seq_lens": compact_seq,
            "max_seq_len": int(physical.max()) if n else 0,
        }
        if seq_cpu is not None:
            upper = seq_cpu.clone()
            upper[:n] -= evicted.to(upper.dtype)
            replaced["seq_lens_cpu_upper_bound"] = upper
        return cm.replace(**replaced), plan

    def plan(
        self, cm: CommonAttentionMetadata, before: torch.Tensor, after: torch.Tensor
    ) -> CompactionPlan | None:
        geometry = self.geometry
        assert geometry is not None
        rows = torch.nonzero(after > before).flatten().tolist()
        if not rows:
            return None
        table = cm.block_table_tensor
        part_cols, ref_cols, req_rows = [], [], []
        for r in rows:
            for part in range(int(before[r]), int(after[r])):
                part_cols.append(list(geometry.partition_columns(part)))
                ref_cols.append(list(geometry.partition_columns(part + 1)))
                req_rows.append(r)
        index = torch.tensor(req_rows, device=table.device)[:, None]
        part_blocks = table[index, torch.tensor(part_cols, device=table.device)]
        ref_blocks = table[index, torch.tensor(ref_cols, device=table.device)]
        stats.record_compactions(len(req_rows), len(req_rows) * geometry.evicted_per_partition)
        return CompactionPlan(part_blocks, ref_blocks, geometry.rule)
