"""LagKV KV-cache spec and manager: vLLM's block pool takes back what compaction evicted.

Invariant (the same as vLLM's sliding-window managers): blocks of partition p are freed only once
the step that compacted p has been processed, i.e. on ``processed_computed_tokens``; the worker
compacts in the step whose tokens complete partition p+1, so by then the kept rows are in p's
first ``keep_blocks`` blocks and the rest are dead.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

import numpy as np
from vllm.config import VllmConfig
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from lrsa_serve import lagkv
from lrsa_serve.config import LagKVConfig
from lrsa_serve.engine import stats
from lrsa_serve.engine.layout import BlockGeometry
from lrsa_serve.engine.prefix_cache import PrefixCacheMixin

PUBLISH_INTERVAL_S = 0.05


@dataclass(frozen=True, kw_only=True)
class LagKVAttentionSpec(FullAttentionSpec):
    """Full attention whose completed lag partitions shrink to their kept tokens."""

    sink: int = 0
    lag: int = 1
    ratio: float = 1.0
    score_v_ratio: float = 1.0

    @property
    def settings(self) -> LagKVConfig:
        return LagKVConfig(
            sink=self.sink, lag=self.lag, ratio=self.ratio, score_v_ratio=self.score_v_ratio
        )

    @property
    def geometry(self) -> BlockGeometry:
        return BlockGeometry.of(self.settings, self.block_size)

    @classmethod
    def wrap(cls, spec: FullAttentionSpec, settings: LagKVConfig) -> LagKVAttentionSpec:
        base = {f.name: getattr(spec, f.name) for f in dataclasses.fields(FullAttentionSpec)}
        return cls(**base, **settings.model_dump())

    @classmethod
    def merge(cls, specs: list[Self]) -> Self:
        # The base rebuilds with cls(...) from its own fields only; put the settings back.
        merged = super().merge(specs)
        assert all(s.settings == specs[0].settings for s in specs), "one LagKV setting per group"
        return dataclasses.replace(merged, **specs[0].settings.model_dump())

    def max_memory_usage_bytes(self, vllm_config: VllmConfig) -> int:
        # Pool sizing: a max-length sequence holds ~S + r*n + 2L tokens, not n.
        max_len = vllm_config.model_config.max_model_len
        return self.geometry.peak_blocks(max_len) * self.page_size_bytes


class LagKVManager(PrefixCacheMixin, FullAttentionManager):
    """Frees the evicted tail blocks of every compressed partition, accounts for occupancy, and
    keeps vLLM's prefix cache true of compacted blocks (``PrefixCacheMixin``)."""

    def __init__(self, kv_cache_spec: LagKVAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.geometry = kv_cache_spec.geometry
        self.settings = kv_cache_spec.settings
        self.rule = self.geometry.rule
        self.processed_tokens: dict[str, int] = {}  # per request, as of its last scheduling
        self.freed_partitions: dict[str, int] = {}  # per request, partitions whose tails are freed
        self.admitted_peaks: dict[str, int] = {}  # peak blocks of requests still growing to it
        self.admitted_peak_sum = 0  # of admitted_peaks: a bound on outstanding_blocks, in O(1)
        self._outstanding: int | None = None  # outstanding_blocks(), kept while the pool is tight
        self.init_prefix_cache()
        self._evicted_blocks = self.geometry.part_blocks - self.geometry.keep_blocks
        # rule.compressed_at(p) = first + p * lag, as plain ints: the per-request, per-step
        # checks below compare against it without a call.
        self._first_compressed_at = self.rule.compressed_at(0)
        self._lag = self.rule.lag
        # Blocks named by vLLM's hash size: a step that fills no block caches nothing.
        self._whole_block_hashes = self.block_pool.hash_block_size == self.block_size
        self._next_publish = 0.0
        stats.SETTINGS_INFO.labels(**self.settings.model_dump(), keep=self.rule.keep).set(1)
        stats.record_occupancy(0, 0)

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock],
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
        prefill_end: int = 0,
    ) -> int:
        # vLLM's exact signature, no *args/**kwargs: this runs for every request at every step.
        if not apply_admission_cap:
            if request_id in self.num_cached_block:
                # A running request (vLLM's own fast path, without the call into it): its
                # blocks for num_tokens, less those it holds (freed tails are null columns).
                held = len(self.req_to_blocks.get(request_id, ()))
                return max(-(-num_tokens // self.block_size) - held, 0)
            return super().get_num_blocks_to_allocate(
                request_id,
                num_tokens,
                new_computed_blocks,
                total_computed_tokens,
                num_local_computed_tokens,
                num_tokens_main_model,
                prefill_end=prefill_end,
            )
        # Admission: a LagKV sequence of num_tokens never holds more than its peak compressed
        # footprint, so that is what it must find free. It also must not take what the requests
        # admitted before it still need: they fill their peaks one chunk (one partition) per
        # step, over many steps, and admitting against today's free blocks alone lets the pool
        # be promised several times over, which ends in preemptions.
        # A prefix hit brings blocks it holds from the start (those no other request holds come
        # out of the free pool too) and null columns for the freed tails of compacted partitions.
        peak = self.geometry.peak_blocks(num_tokens)
        self._retire(request_id)
        held = self.held_blocks_now(request_id) + sum(not b.is_null for b in new_computed_blocks)
        own = max(peak - held, 0) + self._get_num_evictable_blocks(new_computed_blocks)
        others = self.outstanding_blocks()  # retired above: not among them
        self.admitted_peaks[request_id] = peak  # it counts from its first block on
        self.admitted_peak_sum += peak
        return own + others

    def outstanding_blocks(self) -> int:
        """Blocks that admitted requests still have to allocate to reach their peak: the kept
        count while the pool is tight (``spare_blocks``), else summed over the requests."""
        return self.sum_outstanding_blocks() if self._outstanding is None else self._outstanding

    def sum_outstanding_blocks(self) -> int:
        """``outstanding_blocks`` in O(admitted requests); retires those at their peak."""
        outstanding = 0
        for request_id, peak in list(self.admitted_peaks.items()):
            if request_id not in self.req_to_blocks:
                continue  # checked but not admitted: it holds nothing yet
            missing = peak - self.held_blocks_now(request_id)
            if missing <= 0:
                self._retire(request_id)  # at its peak: it only grows by decoding
            else:
                outstanding += missing
        return outstanding

    def _counted(self, request_id: str) -> int | None:
        """What the request adds to the kept ``outstanding_blocks`` now: None when nothing is
        kept or it was never admitted (or has retired), 0 until it holds blocks."""
        if self._outstanding is None:
            return None
        peak = self.admitted_peaks.get(request_id)
        if peak is None:
            return None
        if request_id not in self.req_to_blocks:
            return 0
        return max(peak - self.held_blocks_now(request_id), 0)

    def _recount(self, request_id: str, before: int | None) -> None:
        """After the request's held blocks changed: the kept sum follows (``before``:
        ``_counted`` ahead of the change). At its peak it retires, as in the sum."""
        if before is None:
            return
        after = self._counted(request_id)
        self._outstanding += after - before
        if after == 0:
            self._retire(request_id)

    def allocate_new_blocks(
        self, request_id: str, num_tokens: int, num_tokens_main_model: int
    ) -> list[KVCacheBlock]:
        # Runs for every request at every step, and most decode steps fit the request's last
        # block: then vLLM would allocate nothing (nor copy a hit's partial tail block: LagKV's
        # hits are whole blocks, see add_local_computed_blocks). `get`: req_to_blocks is a
        # defaultdict, and an entry made here would count in the kept outstanding count.
        if len(self.req_to_blocks.get(request_id, ())) * self.block_size >= num_tokens:
            return []
        return self.allocate_blocks(request_id, num_tokens, num_tokens_main_model)

    def allocate_blocks(
        self, request_id: str, num_tokens: int, num_tokens_main_model: int
    ) -> list[KVCacheBlock]:
        """``allocate_new_blocks`` past its fast path: vLLM's allocation, with the raw history
        evicted first and the kept outstanding count following."""
        before = None if self._outstanding is None else self._counted(request_id)
        if self.raw_history.blocks and self.enable_caching:
            self.before_allocation(request_id, num_tokens)
        new = super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)
        if new and before is not None:  # most decode steps allocate nothing
            self._recount(request_id, before)
        return new

    def add_local_computed_blocks(
        self,
        request_id: str,
        new_computed_blocks: Sequence[KVCacheBlock],
        num_local_computed_tokens: int,
        num_external_computed_tokens: int,
    ) -> None:
        before = self._counted(request_id)  # a hit's blocks: once per admission
        # find_longest_cache_hit hands out whole blocks only (allocate_new_blocks relies on it).
        assert not new_computed_blocks or num_local_computed_tokens % self.block_size == 0
        super().add_local_computed_blocks(
            request_id, new_computed_blocks, num_local_computed_tokens, num_external_computed_tokens
        )
        self.after_hit(request_id, new_computed_blocks)
        self._recount(request_id, before)

    def spare_blocks(self, wanted: int) -> int:
        """How many of ``wanted`` blocks can be taken beyond what admitted requests still need.
        Asked for the raw copies the prefix cache makes (thousands per prefill step), so O(1):
        while the pool is roomy the peaks bound what is still needed; once it is tight the
        count is summed once and then kept exact by what changes it (blocks a hit brings or the
        manager allocates, tails freed, departures: ``_counted`` / ``_recount``). Keeping it
        costs every allocation, so it is dropped when the pool is roomy again."""
        free = self.block_pool.get_num_free_blocks()
        if free - wanted >= self.admitted_peak_sum:
            self._outstanding = None
            return wanted
        if self._outstanding is None:
            self._outstanding = self.sum_outstanding_blocks()
        return min(wanted, max(free - self._outstanding, 0))

    def _retire(self, request_id: str) -> None:
        counted = self._counted(request_id)
        if counted:
            self._outstanding -= counted
        self.admitted_peak_sum -= self.admitted_peaks.pop(request_id, 0)

    def held_blocks_now(self, request_id: str) -> int:
        """``held_blocks`` in O(1): the table's length minus the freed tails of compressed
        partitions (as of the last ``remove_skipped_blocks``)."""
        blocks = self.req_to_blocks.get(request_id, ())
        return len(blocks) - self.freed_partitions.get(request_id, 0) * self._evicted_blocks

    def remove_skipped_blocks(
        self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: int | None = None
    ) -> None:
        # Runs for every scheduled request at every step, on the scheduler's critical path in
        # decode: a few int operations unless a partition's tail is due.
        self.processed_tokens[request_id] = processed_computed_tokens
        freed = self.freed_partitions.get(request_id, 0)
        if processed_computed_tokens < self._first_compressed_at + freed * self._lag:
            return  # partition `freed` is not compressed yet (rule.compressed_at(freed))
        compressed = lagkv.compressed_partitions(processed_computed_tokens, self.rule)
        if not self.req_to_blocks.get(request_id):
            return
        blocks = self.req_to_blocks[request_id]
        already = freed
        before = self._counted(request_id)
        for part in range(freed, compressed):
            cols = self.geometry.evicted_columns(part)
            if cols.stop > len(blocks):
                break
            tail = [blocks[c] for c in cols if not blocks[c].is_null]
            self._remove_blocks_in_range(request_id, cols.start, cols.stop)
            self.raw_history.add(tail)  # raw tokens still: cached for shorter hits
            freed = part + 1
        self.freed_partitions[request_id] = freed
        self._recount(request_id, before)
        if freed > already:
            stats.FREED_BLOCKS.inc((freed - already) * self._evicted_blocks)
            self.name_kept_blocks(request_id, blocks, range(already, freed))

    def pop_blocks_for_free(self, request_id: str) -> list:
        # Every way out (finish, abort, preemption) passes here, `free` included.
        self._retire(request_id)  # first: what it still counts reads its freed partitions
        self.processed_tokens.pop(request_id, None)
        self.freed_partitions.pop(request_id, None)
        self.forget_request(request_id)
        if not self.processed_tokens:
            self.publish(force=True)  # an idle engine takes no step that would publish it
        blocks = super().pop_blocks_for_free(request_id)
        self.raw_history.freed(blocks)
        return blocks

    def occupancy(self) -> tuple[int, int]:
        """(resident, logical) KV tokens of the requests, as of their last scheduling: summed
        here, once per step, rather than kept up to date by every request at every step."""
        tokens = np.fromiter(self.processed_tokens.values(), np.int64, len(self.processed_tokens))
        return int(lagkv.resident_tokens_each(tokens, self.rule).sum()), int(tokens.sum())

    def publish(self, force: bool = False) -> None:
        """Occupancy gauges: at most every ``PUBLISH_INTERVAL_S`` from the scheduler's steps
        (a small model's decode step takes a few ms; scrapes come seconds apart), and when the
        last request leaves."""
        if force:
            self._next_publish = 0.0  # and the next step publishes again, whenever it comes
        else:
            now = time.monotonic()
            if now < self._next_publish:
                return
            self._next_publish = now + PUBLISH_INTERVAL_S
        stats.record_occupancy(*self.occupancy())

    def held_blocks(self, request_id: str) -> int:
        """Blocks a request holds now (null entries of freed partitions excluded)."""
        return sum(b is not self._null_block for b in self.req_to_blocks.get(request_id, ()))
