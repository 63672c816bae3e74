"""LagKV KV-cache spec and manager: vLLM's block pool takes back what compaction evicted.

Invariant (the same as vLLM's sliding-window managers): blocks of partition p are freed only once
the step that compacted p has been processed, i.e. on ``processed_computed_tokens``; the worker
compacts in the step whose tokens complete partition p+1, so by then the kept rows are in p's
first ``keep_blocks`` blocks and the rest are dead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Self

from vllm.config import VllmConfig
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import (
    BlockHash,
    BlockHashList,
    KVCacheBlock,
    make_block_hash_with_group_id,
    resolve_block_hashes,
)
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec
from vllm.v1.request import Request

from lrsa_serve import lagkv
from lrsa_serve.config import LagKVConfig
from lrsa_serve.engine import stats
from lrsa_serve.engine.layout import BlockGeometry
from lrsa_serve.engine.prefix_cache import HitRule, RawHistory, kept_block_hash


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


class LagKVManager(FullAttentionManager):
    """Frees the evicted tail blocks of every compressed partition, accounts for occupancy, and
    keeps vLLM's prefix cache true of compacted blocks (``prefix_cache.py``)."""

    def __init__(self, kv_cache_spec: LagKVAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.geometry = kv_cache_spec.geometry
        self.settings = kv_cache_spec.settings
        self.rule = self.geometry.rule
        self.processed_tokens: dict[str, int] = {}  # per request, as of its last scheduling
        self.freed_partitions: dict[str, int] = {}  # per request, partitions whose tails are freed
        self.admitted_peaks: dict[str, int] = {}  # peak blocks of requests still growing to it
        # Prefix cache, per request: partitions whose raw names were dropped (their compaction is
        # planned), and the names their kept blocks take once it has run (tails freed).
        self.renamed_partitions: dict[str, int] = {}
        self.kept_names: dict[str, dict[int, list[BlockHash]]] = {}
        self.raw_copies: list[tuple[KVCacheBlock, KVCacheBlock]] = []  # (source, copy)
        self.raw_history = RawHistory(self.block_pool)
        self.hits = HitRule(self.geometry)
        self.resident_total = 0
        self.logical_total = 0
        self._evicted_blocks = self.geometry.part_blocks - self.geometry.keep_blocks
        stats.record_settings(**self.settings.model_dump(), keep=self.rule.keep)
        stats.record_occupancy(0, 0)

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock],
        *args,
        apply_admission_cap: bool = False,
        **kwargs,
    ) -> int:
        if not apply_admission_cap:
            return super().get_num_blocks_to_allocate(
                request_id, num_tokens, new_computed_blocks, *args, **kwargs
            )
        # Admission: a LagKV sequence of num_tokens never holds more than its peak compressed
        # footprint, so that is what it must find free. It also must not take what the requests
        # admitted before it still need: they fill their peaks one chunk (one partition) per
        # step, over many steps, and admitting against today's free blocks alone lets the pool
        # be promised several times over, which ends in preemptions.
        # A prefix hit brings blocks it holds from the start (those no other request holds come
        # out of the free pool too) and null columns for the freed tails of compacted partitions.
        peak = self.geometry.peak_blocks(num_tokens)
        self.admitted_peaks[request_id] = peak
        held = self.held_blocks_now(request_id) + sum(not b.is_null for b in new_computed_blocks)
        own = max(peak - held, 0) + self._get_num_evictable_blocks(new_computed_blocks)
        return own + self.outstanding_blocks(excluding=request_id)

    def outstanding_blocks(self, excluding: str | None = None) -> int:
        """Blocks that admitted requests still have to allocate to reach their peak."""
        outstanding = 0
        for request_id, peak in list(self.admitted_peaks.items()):
            if request_id == excluding or request_id not in self.req_to_blocks:
                continue  # itself, or checked but not admitted (it holds nothing yet)
            missing = peak - self.held_blocks_now(request_id)
            if missing <= 0:
                del self.admitted_peaks[request_id]  # at its peak: it only grows by decoding
            else:
                outstanding += missing
        return outstanding

    def held_blocks_now(self, request_id: str) -> int:
        """``held_blocks`` in O(1): the table's length minus the freed tails of compressed
        partitions (as of the last ``remove_skipped_blocks``)."""
        blocks = self.req_to_blocks.get(request_id, ())
        return len(blocks) - self.freed_partitions.get(request_id, 0) * self._evicted_blocks

    def remove_skipped_blocks(
        self,
        request_id: str,
        processed_computed_tokens: int,
        num_prompt_tokens: int | None = None,
    ) -> None:
        # Runs for every scheduled request at every step: ints only, nothing published here.
        compressed = lagkv.compressed_partitions(processed_computed_tokens, self.rule)
        self._account(request_id, processed_computed_tokens)
        freed = self.freed_partitions.get(request_id, 0)
        if compressed <= freed or not self.req_to_blocks.get(request_id):
            return
        blocks = self.req_to_blocks[request_id]
        already = freed
        for part in range(freed, compressed):
            cols = self.geometry.evicted_columns(part)
            if cols.stop > len(blocks):
                break
            tail = [blocks[c] for c in cols if not blocks[c].is_null]
            self._remove_blocks_in_range(request_id, cols.start, cols.stop)
            self.raw_history.add(tail)
            freed = part + 1
        self.freed_partitions[request_id] = freed
        if freed > already:
            stats.record_freed_blocks((freed - already) * self._evicted_blocks)
            self._name_kept_blocks(request_id, blocks, range(already, freed))

    def pop_blocks_for_free(self, request_id: str) -> list:
        # Every way out (finish, abort, preemption) passes here, `free` included.
        self._account(request_id, None)
        for per_request in (self.freed_partitions, self.admitted_peaks, self.renamed_partitions):
            per_request.pop(request_id, None)
        self.kept_names.pop(request_id, None)  # compactions that may not have run: stay unnamed
        self.publish()
        return super().pop_blocks_for_free(request_id)

    # ---- prefix cache ------------------------------------------------------------------------

    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes: BlockHashList,
        max_length: int,
        kv_cache_group_ids: list[int],
        block_pool: BlockPool,
        kv_cache_spec: KVCacheSpec,
        drop_eagle_block: bool,
        alignment_tokens: int,
        dcp_world_size: int = 1,
        pcp_world_size: int = 1,
    ) -> tuple[tuple[list[KVCacheBlock], ...], int]:
        # Speculative decoding and context parallelism are refused under LagKV (settings.py).
        assert isinstance(kv_cache_spec, LagKVAttentionSpec) and not drop_eagle_block
        hits = HitRule(kv_cache_spec.geometry)
        block_size = kv_cache_spec.block_size
        hashes = resolve_block_hashes(block_hashes, block_pool.hash_block_size, block_size)
        max_blocks = min(max_length // block_size, len(hashes))
        max_blocks -= max_blocks % max(alignment_tokens // block_size, 1)

        @cache
        def raw(column: int) -> list[KVCacheBlock] | None:
            found = block_pool.get_cached_block(hashes[column], kv_cache_group_ids)
            # A block compaction will rewrite in place is taken only if no request holds it.
            if found and hits.mutable(column) and any(b.ref_cnt for b in found):
                return None
            return found

        @cache
        def kept(partition: int) -> list[list[KVCacheBlock]] | None:
            reference = hashes[hits.reference_column(partition)]
            found = [
                block_pool.get_cached_block(
                    kept_block_hash(reference, partition, index, hits.geometry), kv_cache_group_ids
                )
                for index in range(hits.geometry.keep_blocks)
            ]
            return None if not all(found) else found

        num_blocks = hits.longest(max_blocks, raw, lambda p: kept(p) is not None)
        compressed = hits.compressed(num_blocks)
        computed: tuple[list[KVCacheBlock], ...] = tuple([] for _ in kv_cache_group_ids)
        for column in range(num_blocks):
            place = hits.kept_place(column, compressed)
            if place is None:
                found = raw(column)
            elif place[1] < hits.geometry.keep_blocks:
                found = kept(place[0])[place[1]]
            else:
                found = [block_pool.null_block] * len(kv_cache_group_ids)
            for blocks, block in zip(computed, found, strict=True):
                blocks.append(block)
        return computed, num_blocks * block_size

    def add_local_computed_blocks(
        self,
        request_id: str,
        new_computed_blocks: Sequence[KVCacheBlock],
        num_local_computed_tokens: int,
        num_external_computed_tokens: int,
    ) -> None:
        super().add_local_computed_blocks(
            request_id, new_computed_blocks, num_local_computed_tokens, num_external_computed_tokens
        )
        # A hit arrives with its compacted partitions' tails already null and their blocks named.
        self.raw_history.discard(new_computed_blocks)
        compressed = self.hits.compressed(len(new_computed_blocks))
        self.freed_partitions[request_id] = compressed
        self.renamed_partitions[request_id] = compressed

    def cache_blocks(self, request: Request, num_tokens: int, *args, **kwargs) -> None:
        # vLLM names the newly full blocks by their tokens. The first blocks of every partition
        # this step compacts then hand their names to raw copies (vLLM's copy-on-write copies
        # them before the step's forward, i.e. before compaction rewrites them) or, with no
        # spare block, drop them; their kept rows are named once the compaction has run.
        super().cache_blocks(request, num_tokens, *args, **kwargs)
        request_id = request.request_id
        renamed = self.renamed_partitions.get(request_id, 0)
        compressed = lagkv.compressed_partitions(num_tokens, self.rule)
        if compressed <= renamed:
            return
        blocks = self.req_to_blocks[request_id]
        names = self.kept_names.setdefault(request_id, {})
        for partition in range(renamed, compressed):
            kept_columns = self.geometry.partition_columns(partition)[: self.geometry.keep_blocks]
            for block in (blocks[column] for column in kept_columns):
                if block.block_hash is not None and not self._copy_raw(block):
                    self.block_pool.evict_blocks({block.block_id})
            reference = request.block_hashes[self.hits.reference_column(partition)]
            names[partition] = [
                kept_block_hash(reference, partition, index, self.geometry)
                for index in range(self.geometry.keep_blocks)
            ]
        self.renamed_partitions[request_id] = compressed

    def _copy_raw(self, block: KVCacheBlock) -> bool:
        """Moves ``block``'s names to a copy of it, if a block can be spared from what admitted
        requests still need."""
        if self.block_pool.get_num_free_blocks() <= self.outstanding_blocks():
            return False
        self.raw_history.evict_first(1)
        (copy,) = self.block_pool.get_new_blocks(1)
        self.block_pool.move_block_hashes(block, copy)
        self.raw_history.add([copy])
        # vLLM retains both ends until the copy has run, then frees them once: the copy goes
        # to the evictable cache under the raw names, the original stays with its request.
        block.ref_cnt += 1
        self.raw_copies.append((block, copy))
        return True

    def allocate_new_blocks(
        self, request_id: str, num_tokens: int, *args, **kwargs
    ) -> list[KVCacheBlock]:
        if self.enable_caching:
            needed = -(-num_tokens // self.block_size) - len(self.req_to_blocks.get(request_id, ()))
            self.raw_history.evict_first(needed)
        return super().allocate_new_blocks(request_id, num_tokens, *args, **kwargs)

    def take_pending_cow_copies(self) -> list[tuple[KVCacheBlock, KVCacheBlock]]:
        pending, self.raw_copies = super().take_pending_cow_copies() + self.raw_copies, []
        return pending

    def _name_kept_blocks(
        self, request_id: str, blocks: list[KVCacheBlock], partitions: range
    ) -> None:
        """Names the kept blocks of partitions whose compaction has run (their tails are freed)."""
        names = self.kept_names.get(request_id, {})
        for partition in partitions:
            kept_columns = self.geometry.partition_columns(partition)[: self.geometry.keep_blocks]
            for column, name in zip(kept_columns, names.pop(partition, ()), strict=False):
                block = blocks[column]
                if block.block_hash is None:
                    key = make_block_hash_with_group_id(name, self.kv_cache_group_id)
                    block.set_block_hash(key)
                    self.block_pool.cached_block_hash_to_block.insert(key, block)

    def _account(self, request_id: str, tokens: int | None) -> None:
        old = self.processed_tokens.pop(request_id, None)
        if old is not None:
            self.logical_total -= old
            self.resident_total -= lagkv.resident_tokens(old, self.rule)
        if tokens is not None:
            self.processed_tokens[request_id] = tokens
            self.logical_total += tokens
            self.resident_total += lagkv.resident_tokens(tokens, self.rule)

    def publish(self) -> None:
        """Occupancy gauges, once per scheduler step (and when a request leaves)."""
        stats.record_occupancy(self.resident_total, self.logical_total)

    def held_blocks(self, request_id: str) -> int:
        """Blocks a request holds now (null entries of freed partitions excluded)."""
        return sum(b is not self._null_block for b in self.req_to_blocks.get(request_id, ()))
