"""A step whose prefill chunks span several lag partitions, as attention items (host side).

Within one chunk, queries of different partitions see different histories: a query of partition
q sees the sink, the kept rows of partitions ``< q - 1``, partition q-1 whole and q causally. So
a request's chunk is cut where the history changes (``lagkv.chunk_end_limit``) into items, each
one ordinary paged causal attention over its own block-table row: the sink, the kept columns of
the partitions it sees compressed, then the raw columns from its first raw partition on. The
stock kernels attend items as if they were requests.

Partitions that compress inside the chunk (``pre``: an item after them sees them compressed)
are compacted before the layer's attention. Compaction rewrites a partition's first
``keep_blocks`` blocks, which the items before it still read raw, so those blocks are first
copied to scratch blocks the items' rows point at instead. The partition completed by the
chunk's last token (``post``) compacts after attention, as in a single-partition step; in a
chunk that spans partitions it is copied to scratch too, since the chunk wrote its raw blocks.

The scratch copies are also the prefix cache's raw copies of blocks written and compacted in
one step (vLLM's copy-on-write runs before the step's KV is written): the KV manager copies
them out of the scratch at the next step. Both sides find a partition's scratch blocks without
talking: the copied partitions of a step in the order of their first block's id.
Scratch: ``scratch_partitions`` partitions compacted before attention per step and as many
completed at chunk ends, held back from the pool by the KV manager (``scratch_block_ids``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lrsa_serve import lagkv
from lrsa_serve.kernels.compacted_view import ViewShape


@dataclass(frozen=True)
class ChunkItems:
    """The step's attention items and compaction rows, in logical block columns.

    ``columns[i, j]``: logical block-table column of the request ``item_request[i]`` read by
    the item's physical column j, or ``-1 - s`` for scratch block s (-1 - s < 0), or 0 past
    the item's length (don't care). ``pre_*`` / ``post_*``: (request row, partition) to compact
    before / after attention. ``copy_*``: partitions copied to scratch before attention, the pre
    rows first; scratch block s of an item's row is block ``s % keep_blocks`` of copy row
    ``s // keep_blocks``."""

    item_request: np.ndarray  # [items] request row
    query_start: np.ndarray  # [items + 1] offsets into the step's query tokens
    seq_lens: np.ndarray  # [items] physical key lengths
    columns: np.ndarray  # [items, width] int64
    pre_request: np.ndarray  # [pre]
    pre_partition: np.ndarray  # [pre]
    post_request: np.ndarray  # [post]
    post_partition: np.ndarray  # [post]
    copy_request: np.ndarray  # [copies]
    copy_partition: np.ndarray  # [copies]

    @property
    def num_items(self) -> int:
        return len(self.item_request)


def scratch_partitions(shape: ViewShape, max_num_batched_tokens: int, num_blocks: int) -> int:
    """Partitions a step may compact before attention: one per L tokens of its budget, and at
    most what a sixteenth of the KV cache's ``num_blocks`` holds twice."""
    wanted = max(1, max_num_batched_tokens // shape.rule.lag)
    return max(1, min(wanted, num_blocks // (32 * shape.keep_blocks)))


def scratch_block_ids(shape: ViewShape, max_num_batched_tokens: int, num_blocks: int) -> list[int]:
    """The blocks the KV manager holds back as scratch, the same in every process: the last
    ones of the ``num_blocks`` the KV cache has. A spanning chunk copies its partitions
    compacted before attention and the one its last token completes: at most twice the
    former."""
    count = 2 * scratch_partitions(shape, max_num_batched_tokens, num_blocks) * shape.keep_blocks
    return list(range(num_blocks - count, num_blocks))


def pre_partitions(start: int, end: int, rule: lagkv.Rule) -> int:
    """Partitions a chunk of tokens ``[start, end)`` compresses before attention."""
    last = max(start, end - 1)
    return lagkv.compressed_partitions(last, rule) - lagkv.compressed_partitions(start, rule)


def split_chunks(seq_lens: np.ndarray, query_start: np.ndarray, shape: ViewShape) -> ChunkItems:
    """Items and compaction rows of a step: ``seq_lens`` (logical, after the step's tokens) and
    ``query_start`` ([reqs + 1]) of vLLM's requests, as numpy int arrays."""
    rule = shape.rule
    b, sink_cols, part_cols, keep_cols = (
        shape.block_size, shape.sink_blocks, shape.part_blocks, shape.keep_blocks,
    )  # fmt: skip
    evicted = rule.lag - rule.keep
    item_request, starts, lens, rows = [], [int(query_start[0])], [], []
    pre_request, pre_partition, post_request, post_partition = [], [], [], []
    spanning_post: list[tuple[int, int]] = []
    for r in range(len(seq_lens)):
        seq = int(seq_lens[r])
        a = seq - int(query_start[r + 1] - query_start[r])
        c0 = lagkv.compressed_partitions(a, rule)
        v_last = lagkv.compressed_partitions(max(a, seq - 1), rule)
        first_slot = len(pre_request) * keep_cols
        pre_request += [r] * (v_last - c0)
        pre_partition += range(c0, v_last)
        if lagkv.compressed_partitions(seq, rule) > v_last:
            post_request.append(r)
            post_partition.append(v_last)
            if v_last > c0:
                spanning_post.append((r, v_last))
        s = a
        while s < seq:
            e = min(lagkv.chunk_end_limit(s, rule), seq)
            v = lagkv.compressed_partitions(s, rule)
            cols = list(range(sink_cols))
            for p in range(v):
                first = sink_cols + p * part_cols
                cols += range(first, first + keep_cols)
            raw_first = sink_cols + v * part_cols
            for col in range(raw_first, -(-e // b)):
                p, offset = divmod(col - sink_cols, part_cols)
                if c0 <= p < v_last and offset < keep_cols:  # rewritten before attention
                    col = -1 - (first_slot + (p - c0) * keep_cols + offset)
                cols.append(col)
            item_request.append(r)
            starts.append(starts[-1] + e - s)
            lens.append(e - v * evicted)
            rows.append(cols)
            s = e
    width = max((len(c) for c in rows), default=1)
    columns = np.zeros((len(rows), width), dtype=np.int64)
    for i, cols in enumerate(rows):
        columns[i, : len(cols)] = cols
    as_array = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return ChunkItems(
        as_array(item_request), as_array(starts), as_array(lens), columns,
        as_array(pre_request), as_array(pre_partition),
        as_array(post_request), as_array(post_partition),
        as_array(pre_request + [r for r, _ in spanning_post]),
        as_array(pre_partition + [p for _, p in spanning_post]),
    )  # fmt: skip
