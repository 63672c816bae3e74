"""Scheduler of LagKV prefill chunks.

Tokens of one chunk see different histories once the chunk spans a partition boundary; the
attention backends cut such a chunk into items that each see one (``chunk_items``), and
compact the partitions that compress inside it before the layer's attention, through a fixed
number of scratch blocks. So a chunk may span several partitions as long as:

- the step's chunks compress at most ``scratch_partitions`` partitions before attention, and
  its items (requests + those partitions) stay within ``max_num_seqs``;
- the pool has room for the chunk's raw blocks beyond one partition without touching what
  admitted requests still need (``LagKVManager.spare_blocks``; those blocks come back a step
  later, compacted). Where it has room for some of them, the chunk is cut to fit: a tight pool
  still prefills more than one partition per request and step where it can spare the blocks.

Otherwise vLLM's own order and budget: first come, first served.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from lrsa_serve import lagkv
from lrsa_serve.engine.chunk_items import pre_partitions, scratch_block_ids, scratch_partitions
from lrsa_serve.engine.kv_spec import LagKVManager
from lrsa_serve.engine.settings import check_engine_config, settings_from_vllm_config


class LagKVSchedulingMixin:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = settings_from_vllm_config(self.vllm_config)
        if settings is not None:
            check_engine_config(settings, self.vllm_config)
        self.lagkv = None if settings is None else settings.rule
        self._scratch = self._scratch_left = 0  # partitions a step may compact before attention
        managers = self.lagkv_managers()  # one LagKV setting: one group
        self._manager = managers[0] if self.lagkv is not None and managers else None
        if (manager := self._manager) is not None:
            pool = manager.block_pool.num_gpu_blocks
            sizes = manager.geometry, self.max_num_scheduled_tokens, pool
            self._scratch = scratch_partitions(*sizes)
            manager.hold_scratch(scratch_block_ids(*sizes))

    def _reserve_prefill_lookahead(self, request, num_computed_tokens: int, num_new_tokens: int):
        # The last clip vLLM applies to a chunk (all paths call it, for every request at every
        # step); we clip after it. One token never crosses a boundary (every decode step), and
        # vLLM's own clip only acts for multi-token drafters, which LagKV refuses.
        if num_new_tokens <= 1 and self.lagkv is not None:
            return num_new_tokens
        num_new_tokens = super()._reserve_prefill_lookahead(
            request, num_computed_tokens, num_new_tokens
        )
        if self._manager is None or num_new_tokens <= 1:
            return num_new_tokens
        return self.chunk_length(num_computed_tokens, num_new_tokens)

    def chunk_length(self, start: int, wanted: int) -> int:
        """The chunk from ``start``: ``wanted`` tokens, short of what the step's scratch and the
        pool allow past the current partition."""
        rule = self.lagkv
        single = lagkv.chunk_end_limit(start, rule)
        end = start + wanted
        if end <= single:
            return wanted
        if not self._scratch_left:
            return single - start
        reach = lagkv.compressed_partitions(start, rule) + self._scratch_left + 2
        end = min(end, lagkv.partition_start(reach, rule))
        block = self._manager.block_size
        single_blocks = -(-single // block)
        spare = self._manager.spare_blocks(-(-end // block) - single_blocks)
        end = min(end, (single_blocks + spare) * block)
        if end <= single:
            return single - start
        self._scratch_left -= pre_partitions(start, end, rule)
        return end - start

    def schedule(self, *args: Any, **kwargs: Any):
        # A step's items are its requests + the partitions compacted before attention, and
        # FlashAttention 3 sizes its per-batch scheduling buffer for max_num_seqs of them.
        requests = min(sum(self.get_request_counts()), self.max_num_running_reqs)
        self._scratch_left = min(self._scratch, self.max_num_running_reqs - requests)
        output = super().schedule(*args, **kwargs)
        for manager in self.lagkv_managers():
            manager.settle_scratch(output.num_scheduled_tokens)
            manager.publish()  # the occupancy gauges, once per step rather than per request
        return output

    def lagkv_managers(self) -> list[LagKVManager]:
        managers = self.kv_cache_manager.coordinator.single_type_managers
        return [m for m in managers if isinstance(m, LagKVManager)]


class LagKVScheduler(LagKVSchedulingMixin, Scheduler):
    pass


class LagKVAsyncScheduler(LagKVSchedulingMixin, AsyncScheduler):
    pass


def make_scheduler(*args: Any, **kwargs: Any) -> Scheduler:
    """``scheduler_cls`` target: vLLM decides async scheduling after the engine args are given,
    so pick the matching base here, when the engine core builds its scheduler."""
    vllm_config = kwargs.get("vllm_config", args[0] if args else None)
    async_scheduling = bool(vllm_config.scheduler_config.async_scheduling)
    return (LagKVAsyncScheduler if async_scheduling else LagKVScheduler)(*args, **kwargs)
