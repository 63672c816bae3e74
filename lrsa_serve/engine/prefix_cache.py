"""Prefix caching over a compacted cache: how long a hit may be, and what names a kept block.

A hit of M cached tokens must hand the request the cache it would have built by computing them
itself: the sink's blocks, the kept blocks of the ``c = compressed(M)`` partitions before (their
freed tails stay null), and the raw blocks from partition c on, up to M.

- Raw blocks keep vLLM's own names (chained hashes of the tokens, a cache salt in the first).
- The kept rows of partition p are a function of the tokens through the end of p+1 and of the
  rule, so its kept blocks are named by the chained hash of p+1's last block, the rule and their
  place: a request whose tokens differ anywhere before that end, or whose rule differs, never
  finds them.
- Compaction rewrites a partition's first ``keep_blocks`` blocks in place, so a raw block there
  is mutable: a hit takes it only while no running request holds it (the hitter then owns it).
  Sink blocks, kept blocks and a raw partition's tail are never rewritten and are shared.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache

from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import (
    BlockHash,
    BlockHashList,
    BlockHashWithGroupId,
    KVCacheBlock,
    make_block_hash_with_group_id,
    resolve_block_hashes,
)
from vllm.v1.kv_cache_interface import KVCacheSpec
from vllm.v1.request import Request

from lrsa_serve import lagkv
from lrsa_serve.engine.layout import BlockGeometry


@dataclass(frozen=True)
class HitRule:
    """The hit-length rule in block columns of one request."""

    geometry: BlockGeometry

    def compressed(self, num_blocks: int) -> int:
        """Partitions compacted in the state a hit of ``num_blocks`` blocks hands over."""
        g = self.geometry
        return lagkv.compressed_partitions(num_blocks * g.block_size, g.rule)

    def kept_place(self, column: int, compressed: int) -> tuple[int, int] | None:
        """(partition, index among its kept blocks) where ``column`` lies in one of the first
        ``compressed`` partitions, else None (a sink or raw column)."""
        g = self.geometry
        partition, index = divmod(column - g.sink_blocks, g.part_blocks)
        if column < g.sink_blocks or partition >= compressed:
            return None
        return partition, index

    def mutable(self, column: int) -> bool:
        """Whether compaction will rewrite this column's raw block in place."""
        g = self.geometry
        return column >= g.sink_blocks and (column - g.sink_blocks) % g.part_blocks < g.keep_blocks

    def longest(
        self, max_blocks: int, raw: Callable[[int], bool], kept: Callable[[int], bool]
    ) -> int:
        """Longest hit in blocks, at most ``max_blocks``. ``raw(column)``: a usable raw block is
        cached for that column; ``kept(p)``: all kept blocks of partition p are cached.

        Hits with c compacted partitions end in ``[S + (c+1)L, S + (c+2)L)``: these ranges grow
        with c, so the largest c whose state is complete gives the longest hit."""
        g = self.geometry
        sink, part = g.sink_blocks, g.part_blocks

        def raw_run(start: int, stop: int) -> int:
            end = start
            while end < stop and raw(end):
                end += 1
            return end

        kept_prefix = 0
        sink_cached = raw_run(0, min(sink, max_blocks)) == sink
        for c in range(self.compressed(max_blocks) if sink_cached else 0, 0, -1):
            while kept_prefix < c and kept(kept_prefix):
                kept_prefix += 1
            if kept_prefix < c:
                continue
            low, high = sink + (c + 1) * part, min(sink + (c + 2) * part - 1, max_blocks)
            end = raw_run(sink + c * part, high)
            if end >= low:
                return end
        return raw_run(0, min(sink + 2 * part - 1, max_blocks))


def kept_block_hash(
    reference: BlockHash, partition: int, index: int, geometry: BlockGeometry
) -> BlockHash:
    """Name of the ``index``-th kept block of ``partition``: the chained hash of partition p+1's
    last block (``reference``) with the rule, the block size and the place."""
    rule = geometry.rule
    tag = f"lagkv:{rule.sink}:{rule.lag}:{rule.keep}:{rule.score_v_ratio!r}:{geometry.block_size}"
    tag += f":{partition}:{index}"
    return BlockHash(hashlib.sha256(bytes(reference) + tag.encode()).digest())


def kept_block_hashes(
    block_hashes: Sequence[BlockHash], partition: int, geometry: BlockGeometry
) -> list[BlockHash]:
    """Names of ``partition``'s kept blocks in a request whose full blocks are named
    ``block_hashes``: from the name of partition p+1's last block (``kept_block_hash``)."""
    reference = block_hashes[geometry.partition_columns(partition + 1).stop - 1]
    return [kept_block_hash(reference, partition, i, geometry) for i in range(geometry.keep_blocks)]


class RawHistory:
    """Raw blocks of partitions their request has compacted (its freed tails, the copies of the
    blocks compaction rewrote), cached for hits that end earlier than where the request went.

    A conversation's next turn needs only its state (sink, kept blocks, raw window), and those
    are freed when the request ends, after the history it released on the way: in vLLM's one
    LRU free queue the history would outlive the state of every earlier conversation. So when
    the pool must give up cached blocks, the oldest raw history goes first."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        # block id -> the name it had when it became history, oldest first. Names are bytes:
        # tens of thousands of entries that Python's cyclic GC need not traverse (a tuple per
        # entry made each of its full collections walk them all, every few prefill steps).
        self.blocks: OrderedDict[int, BlockHashWithGroupId] = OrderedDict()
        # Cached blocks that were not history when their request freed them (its sink, kept
        # blocks and raw window): until one is, no such block can stand before the history in
        # the free queue, and evict_first has nothing to do.
        self.others_freed = 0

    def add(self, blocks: Iterable[KVCacheBlock]) -> None:
        for block in blocks:
            if block.block_hash is not None:
                self.blocks[block.block_id] = block.block_hash
                self.blocks.move_to_end(block.block_id)

    def discard(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Blocks a hit took: they are that request's state now."""
        for block in blocks:
            self.blocks.pop(block.block_id, None)

    def holds(self, block: KVCacheBlock) -> bool:
        name = self.blocks.get(block.block_id)
        return name is not None and name == block.block_hash

    def cached_elsewhere(self, block: KVCacheBlock) -> bool:
        """Cached under a name that is not history's (a request's own state)."""
        return block.block_hash is not None and not self.holds(block)

    def freed(self, blocks: Iterable[KVCacheBlock]) -> None:
        """A request's blocks, as it leaves (finished, aborted or preempted)."""
        self.others_freed += sum(map(self.cached_elsewhere, blocks))

    def evict_first(self, count: int) -> None:
        """Before ``count`` blocks leave the free queue: the cached blocks at its front that are
        not raw history swap places with the oldest raw history still free. Asked before every
        allocation while there is history (tens per prefill step), so the scan of the queue's
        front waits until some request has freed cached blocks of its own."""
        if self.others_freed:
            self.promote(count)

    def promote(self, count: int) -> None:
        """``evict_first`` past its fast path."""
        queue = self.pool.free_block_queue
        front = itertools.islice(queue.iter_blocks_after(None), count)
        wanted = sum(map(self.cached_elsewhere, front))
        promoted: list[KVCacheBlock] = []
        for block_id, name in list(itertools.islice(self.blocks.items(), 4 * wanted)):
            if len(promoted) == wanted:
                break
            block = self.pool.blocks[block_id]
            if block.block_hash != name:
                del self.blocks[block_id]  # reused since: no longer history
            elif block.ref_cnt == 0:
                del self.blocks[block_id]
                promoted.append(block)
        for block in promoted:
            queue.remove(block)
        queue.prepend_n(promoted)


class PrefixCacheMixin:
    """The LagKV KV manager's prefix cache (vLLM's ``SingleTypeKVCacheManager`` hooks): finds
    hits whose state is complete, renames what compaction changes, and evicts raw history
    first. Reads the manager's ``geometry``, ``rule`` (and its per-step forms
    ``_first_compressed_at``, ``_lag``), ``_whole_block_hashes``, ``freed_partitions`` and
    ``spare_blocks``; the manager calls ``before_allocation`` and ``after_hit``."""

    def init_prefix_cache(self) -> None:
        # Per request: partitions whose raw names were moved or dropped (their compaction is
        # planned), and the names their kept blocks take once it has run (tails freed).
        self.renamed_partitions: dict[str, int] = {}
        self.kept_names: dict[str, dict[int, list[BlockHash]]] = {}
        self.raw_copies: list[tuple[KVCacheBlock, KVCacheBlock]] = []  # (source, copy)
        self.raw_history = RawHistory(self.block_pool)
        self.hits = HitRule(self.geometry)

    def forget_request(self, request_id: str) -> None:
        self.renamed_partitions.pop(request_id, None)
        self.kept_names.pop(request_id, None)  # compactions that may not have run: stay unnamed

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
        assert not drop_eagle_block
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
            names = kept_block_hashes(hashes, partition, hits.geometry)
            found = [block_pool.get_cached_block(name, kv_cache_group_ids) for name in names]
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

    def after_hit(self, request_id: str, new_computed_blocks: Sequence[KVCacheBlock]) -> None:
        """After the manager took a hit's blocks (``add_local_computed_blocks``): they arrive
        with their compacted partitions' tails already null and their blocks named."""
        self.raw_history.discard(new_computed_blocks)
        compressed = self.hits.compressed(len(new_computed_blocks))
        self.freed_partitions[request_id] = compressed
        self.renamed_partitions[request_id] = compressed

    def cache_blocks(
        self,
        request: Request,
        num_tokens: int,
        retention_interval: int | None = None,
        *,
        replay_boundaries: Sequence[int],
    ) -> None:
        # Runs for every request at every step. Most decode steps fill no block: then vLLM would
        # name nothing (its names are whole blocks), and nothing compacts either (compaction
        # thresholds, S + (p+2)L, are block boundaries: a step that reaches one fills a block).
        if (
            num_tokens // self.block_size <= self.num_cached_block.get(request.request_id, 0)
            and self._whole_block_hashes
        ):
            return
        self.name_blocks(request, num_tokens, retention_interval, replay_boundaries)

    def name_blocks(
        self,
        request: Request,
        num_tokens: int,
        retention_interval: int | None,
        replay_boundaries: Sequence[int],
    ) -> None:
        """``cache_blocks`` past its fast path. vLLM names the newly full blocks by their tokens.
        The first blocks of every partition this step compacts then hand their names to raw
        copies (vLLM's copy-on-write copies them before the step's forward, i.e. before
        compaction rewrites them) or drop them: without a spare block, and for blocks this very
        step writes (partition 0 in a first chunk, which also compacts it: the copy would run
        before the write). Their kept rows are named once the compaction has run."""
        request_id = request.request_id
        renamed = self.renamed_partitions.get(request_id, 0)
        if num_tokens < self._first_compressed_at + renamed * self._lag:
            # No new partition compacts (every decode step but one in L): vLLM's naming only.
            return super().cache_blocks(
                request, num_tokens, retention_interval, replay_boundaries=replay_boundaries
            )
        written = self.num_cached_block.get(request_id, 0)  # blocks complete before this step
        super().cache_blocks(
            request, num_tokens, retention_interval, replay_boundaries=replay_boundaries
        )
        compressed = lagkv.compressed_partitions(num_tokens, self.rule)
        blocks = self.req_to_blocks[request_id]
        names = self.kept_names.setdefault(request_id, {})
        to_copy: list[KVCacheBlock] = []
        to_drop: list[KVCacheBlock] = []
        for partition in range(renamed, compressed):
            for column in self.geometry.kept_columns(partition):
                block = blocks[column]
                if block.block_hash is not None:
                    (to_drop if column >= written else to_copy).append(block)
            names[partition] = kept_block_hashes(request.block_hashes, partition, self.geometry)
        to_drop += to_copy[self._copy_raw(to_copy) :]
        if to_drop:
            self.block_pool.evict_blocks({block.block_id for block in to_drop})
        self.renamed_partitions[request_id] = compressed

    def _copy_raw(self, blocks: list[KVCacheBlock]) -> int:
        """Moves the names of the first ``blocks`` to copies of them, as many as can be spared
        from what admitted requests still need; returns how many."""
        count = self.spare_blocks(len(blocks)) if blocks else 0
        if not count:
            return 0
        self.raw_history.evict_first(count)
        copies = self.block_pool.get_new_blocks(count)
        for block, copy in zip(blocks, copies, strict=False):  # the first `count`
            self.block_pool.move_block_hashes(block, copy)
            # vLLM retains both ends until the copy has run, then frees them once: the copy
            # goes to the evictable cache under the raw names, the original stays with its
            # request.
            block.ref_cnt += 1
            self.raw_copies.append((block, copy))
        self.raw_history.add(copies)
        return count

    def before_allocation(self, request_id: str, num_tokens: int) -> None:
        """Before the manager allocates the request's blocks for ``num_tokens`` tokens (while
        there is raw history): the oldest raw history leaves the free queue first."""
        needed = -(-num_tokens // self.block_size) - len(self.req_to_blocks.get(request_id, ()))
        if needed > 0:  # most decode steps allocate nothing
            self.raw_history.evict_first(needed)

    def take_pending_cow_copies(self) -> list[tuple[KVCacheBlock, KVCacheBlock]]:
        pending, self.raw_copies = super().take_pending_cow_copies() + self.raw_copies, []
        return pending

    def name_kept_blocks(
        self, request_id: str, blocks: list[KVCacheBlock], partitions: range
    ) -> None:
        """Names the kept blocks of partitions whose compaction has run (their tails are freed)."""
        names = self.kept_names.get(request_id, {})
        for partition in partitions:
            kept_columns = self.geometry.kept_columns(partition)
            for column, name in zip(kept_columns, names.pop(partition, ()), strict=False):
                block = blocks[column]
                if block.block_hash is None:
                    key = make_block_hash_with_group_id(name, self.kv_cache_group_id)
                    block.set_block_hash(key)
                    self.block_pool.cached_block_hash_to_block.insert(key, block)
