"""Scheduler that ends prefill chunks on lag-partition boundaries.

Tokens of one scheduled chunk all see the cache as it was when the chunk started. A chunk that
stays below ``S + 2L``, or inside one partition after that, therefore attends exactly under the
LagKV visibility rule with plain causal attention over the compacted cache
(``lagkv.chunk_end_limit``). Several requests still share each step's token budget.

A request therefore prefills at most one partition per step, and vLLM's first-come-first-served
order leaves the requests admitted last to run their many steps in a tail of part-empty steps.
While the pool has room, each step's budget is shared evenly among the requests in prefill and
those waiting for a seat (``prefill_share``), so they all start early and the steps stay full.
Once the pool refuses a waiting request, first-come-first-served order again: finishing the
earliest requests first frees their blocks soonest.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from lrsa_serve import lagkv
from lrsa_serve.engine.kv_spec import LagKVManager
from lrsa_serve.engine.settings import check_engine_config, settings_from_vllm_config

# The shortest chunk the share gives a request: about one query tile of FlashAttention, as a
# shorter chunk reads the request's whole cache for fewer queries.
SHARE_FLOOR = 128
UNCAPPED = 1 << 62


class LagKVSchedulingMixin:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = settings_from_vllm_config(self.vllm_config)
        if settings is not None:
            check_engine_config(settings, self.vllm_config)
        self.lagkv = None if settings is None else settings.rule
        self._share: int | None = None  # this step's chunk cap, set at its first prefill chunk
        self._pool_bound = False  # the pool refused a request that is still waiting

    def _reserve_prefill_lookahead(self, request, num_computed_tokens: int, num_new_tokens: int):
        # The last clip vLLM applies to a chunk (all paths call it, for every request at every
        # step); we clip after it. One token never crosses a boundary (every decode step), and
        # vLLM's own clip only acts for multi-token drafters, which LagKV refuses.
        if num_new_tokens <= 1 and self.lagkv is not None:
            return num_new_tokens
        num_new_tokens = super()._reserve_prefill_lookahead(
            request, num_computed_tokens, num_new_tokens
        )
        if self.lagkv is None or num_new_tokens <= 1:
            return num_new_tokens
        limit = lagkv.chunk_end_limit(num_computed_tokens, self.lagkv) - num_computed_tokens
        return min(num_new_tokens, limit, self.prefill_share())

    def prefill_share(self) -> int:
        """The longest prefill chunk of this step: the budget shared evenly among the requests in
        prefill and those waiting for a free seat, at least ``SHARE_FLOOR``; uncapped while the
        pool binds. Counted once per step, at its first prefill chunk (decode steps never ask)."""
        if self._share is None:
            if self._pool_bound:
                self._share = UNCAPPED
            else:
                prefilling = sum(r.num_computed_tokens < r.num_prompt_tokens for r in self.running)
                seats = self.max_num_running_reqs - len(self.running)
                sharing = max(1, prefilling + min(len(self.waiting), seats))
                self._share = max(SHARE_FLOOR, -(-self.max_num_scheduled_tokens // sharing))
        return self._share

    def schedule(self, *args: Any, **kwargs: Any):
        self._share = None  # counted afresh at this step's first prefill chunk
        output = super().schedule(*args, **kwargs)
        if not self.waiting:
            self._pool_bound = False
        elif (
            output.total_num_scheduled_tokens < self.max_num_scheduled_tokens
            and len(self.running) < self.max_num_running_reqs
        ):
            # budget and seats left, yet a request waits: the pool would not take it
            self._pool_bound = True
        for manager in self.lagkv_managers():
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
