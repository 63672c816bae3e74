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
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import BlockHash, BlockHashWithGroupId, KVCacheBlock

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

    def reference_column(self, partition: int) -> int:
        """The last column of partition p+1: its chained hash names p's kept blocks."""
        return self.geometry.partition_columns(partition + 1).stop - 1

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


class RawHistory:
    """Raw blocks of partitions their request has compacted (its freed tails, the copies of the
    blocks compaction rewrote), cached for hits that end earlier than where the request went.

    A conversation's next turn needs only its state (sink, kept blocks, raw window), and those
    are freed when the request ends, after the history it released on the way: in vLLM's one
    LRU free queue the history would outlive the state of every earlier conversation. So when
    the pool must give up cached blocks, the oldest raw history goes first."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        # block id -> (block, the name it had when it became history), oldest first
        self.blocks: OrderedDict[int, tuple[KVCacheBlock, BlockHashWithGroupId]] = OrderedDict()

    def add(self, blocks: Iterable[KVCacheBlock]) -> None:
        for block in blocks:
            if block.block_hash is not None:
                self.blocks[block.block_id] = (block, block.block_hash)
                self.blocks.move_to_end(block.block_id)

    def discard(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Blocks a hit took: they are that request's state now."""
        for block in blocks:
            self.blocks.pop(block.block_id, None)

    def holds(self, block: KVCacheBlock) -> bool:
        entry = self.blocks.get(block.block_id)
        return entry is not None and entry[1] == block.block_hash

    def evict_first(self, count: int) -> None:
        """Before ``count`` blocks leave the free queue: the cached blocks at its front that are
        not raw history swap places with the oldest raw history still free."""
        queue = self.pool.free_block_queue
        front = itertools.islice(queue.iter_blocks_after(None), count)
        wanted = sum(b.block_hash is not None and not self.holds(b) for b in front)
        promoted: list[KVCacheBlock] = []
        for block_id, (block, name) in list(itertools.islice(self.blocks.items(), 4 * wanted)):
            if len(promoted) == wanted:
                break
            if block.block_hash != name:
                del self.blocks[block_id]  # reused since: no longer history
            elif block.ref_cnt == 0:
                del self.blocks[block_id]
                promoted.append(block)
        for block in promoted:
            queue.remove(block)
        queue.prepend_n(promoted)
