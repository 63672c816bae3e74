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

import numpy as np
import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

from lrsa_serve.config import LagKVConfigError
from lrsa_serve.engine import settings as engine_settings
from lrsa_serve.engine import stats
from lrsa_serve.engine.chunk_items import ChunkItems, scratch_block_ids, split_chunks
from lrsa_serve.engine.compaction import CompactionPlan, PreCompaction
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
        self.vllm_config = vllm_config
        self._scratch: torch.Tensor | None = None

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        view, plan, pre = self.lagkv_view(common_attn_metadata)
        meta = super().build(common_prefix_len, view, fast_build)
        if plan is None:
            return meta
        return with_fields(meta, self.metadata_cls, self.metadata_fields(plan, pre))

    def metadata_fields(
        self, plan: CompactionPlan, pre: PreCompaction | None = None
    ) -> dict[str, Any]:
        return {"compaction": plan, "pre_compaction": pre}

    def lagkv_view(
        self, cm: CommonAttentionMetadata
    ) -> tuple[CommonAttentionMetadata, CompactionPlan | None, PreCompaction | None]:
        if self.view is None:
            return cm, None, None
        assert self.geometry is not None
        host = host_view(
            self.geometry, cm.seq_lens_cpu_upper_bound, cm.query_start_loc_cpu, cm.num_reqs,
            cm.max_seq_len,
        )  # fmt: skip
        if host is not None and host.spans:
            seq = cm.seq_lens_cpu_upper_bound[: cm.num_reqs].numpy()
            starts = cm.query_start_loc_cpu[: cm.num_reqs + 1].numpy()
            return self.item_view(cm, split_chunks(seq, starts, self.geometry))
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
        return cm.replace(**replaced), self.view.plan(table.shape[0], host), None

    @property
    def scratch(self) -> torch.Tensor:
        """The scratch block ids, as the scheduler's KV manager holds them back: from the KV
        cache's size, known once it is allocated (vLLM's memory profiling runs without one)."""
        num_blocks = self.vllm_config.cache_config.num_gpu_blocks
        budget = self.vllm_config.scheduler_config.max_num_batched_tokens
        if num_blocks is None:  # the null block for every id: nothing is read or written there
            ids = scratch_block_ids(self.geometry, budget, 1 << 30)
            return torch.zeros(len(ids), dtype=torch.int32, device=self.view.device)
        if self._scratch is None:
            ids = scratch_block_ids(self.geometry, budget, num_blocks)
            self._scratch = torch.tensor(ids, dtype=torch.int32, device=self.view.device)
        return self._scratch

    def item_view(
        self, cm: CommonAttentionMetadata, items: ChunkItems
    ) -> tuple[CommonAttentionMetadata, CompactionPlan, PreCompaction]:
        """A step with multi-partition chunks (never a captured graph: prefill): its items as
        the requests the stock metadata describes, and both compaction plans, from the host's
        split (``chunk_items``) and device gathers of vLLM's block table."""
        g = self.geometry
        table = cm.block_table_tensor
        device = table.device

        def on_device(x, to: torch.device = device) -> torch.Tensor:
            return torch.from_numpy(x).to(to, non_blocking=True)

        def blocks_of(requests: np.ndarray, partitions: np.ndarray, count: int) -> torch.Tensor:
            """Block ids of each row's partition and the ``count - 1`` after it."""
            first = g.sink_blocks + partitions * g.part_blocks
            cols = first[:, None] + np.arange(count * g.part_blocks)[None, :]
            return table[on_device(requests)[:, None], on_device(cols)]

        # Scratch: copy row k's blocks go to the scratch place of its rank by first block id
        # (the KV manager ranks the same rows alike, chunk_items).
        copied = blocks_of(items.copy_request, items.copy_partition, 1)[:, : g.keep_blocks]
        rank = torch.argsort(torch.argsort(copied[:, 0]))
        places = rank[:, None] * g.keep_blocks + torch.arange(g.keep_blocks, device=device)
        scratch = self.scratch[places].reshape(-1)  # [copies * keep_blocks], copy-row order
        columns = on_device(items.columns)
        rows = table[on_device(items.item_request)[:, None], columns.clamp(min=0)]
        if len(scratch):
            read = scratch[(-1 - columns).clamp(min=0, max=len(scratch) - 1)]
            rows = torch.where(columns < 0, read.to(rows.dtype), rows)
        seq_cpu = torch.from_numpy(items.seq_lens.astype(np.int32))
        starts_cpu = torch.from_numpy(items.query_start.astype(np.int32))
        query_lens = items.query_start[1:] - items.query_start[:-1]
        is_prefilling = cm.is_prefilling
        if is_prefilling is not None:
            # on the host or the device, as vLLM keeps it
            is_prefilling = is_prefilling[on_device(items.item_request, is_prefilling.device)]
        view = cm.replace(
            num_reqs=items.num_items,
            query_start_loc=starts_cpu.to(device, non_blocking=True),
            query_start_loc_cpu=starts_cpu,
            seq_lens=seq_cpu.to(device, non_blocking=True),
            seq_lens_cpu_upper_bound=seq_cpu,
            max_query_len=int(query_lens.max()),
            max_seq_len=int(items.seq_lens.max()),
            block_table_tensor=rows,
            is_prefilling=is_prefilling,
            req_idx=None if cm.req_idx is None else cm.req_idx[items.item_request],
            _num_computed_tokens_cache=None,
            _token_to_req_indices_cache=None,
        )

        def plan(requests: np.ndarray, partitions: np.ndarray) -> CompactionPlan:
            blocks = blocks_of(requests, partitions, 2)
            return CompactionPlan(
                blocks[:, : g.part_blocks], blocks[:, g.part_blocks :], g.rule,
                launch=len(requests) > 0,
            )  # fmt: skip

        post = plan(items.post_request, items.post_partition)
        pre = plan(items.pre_request, items.pre_partition)
        compressing = len(items.pre_request) + len(items.post_request)
        stats.record_compactions(compressing, compressing * g.rule.evicted)
        return view, post, PreCompaction(pre, copied.reshape(-1).long(), scratch.long())


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
        pre = getattr(attn_metadata, "pre_compaction", None)
        if pre is not None and pre.plan.launch and kv_cache.dim() == 4:
            self.pre_compact(layer, kv_cache, pre)
        result = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs
        )
        plan = getattr(attn_metadata, "compaction", None)
        if plan is not None:
            self.compact(layer, kv_cache, attn_metadata, plan)
        return result

    def compact(self, layer, kv_cache: torch.Tensor, attn_metadata, plan: CompactionPlan) -> None:
        raise NotImplementedError

    def pre_compact(self, layer, kv_cache: torch.Tensor, pre: PreCompaction) -> None:
        """This layer's copies to scratch, then its compaction of ``pre.plan`` (the step's KV
        is already in the cache: vLLM writes it before the layer's forward)."""
        raise NotImplementedError
