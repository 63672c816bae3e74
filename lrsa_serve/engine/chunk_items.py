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
    ``query_start`` ([reqs + 1]) of vLLM's requests, as numpy int arrays. Vectorised: it runs
    on the host of every spanning step, for hundreds of items."""
    rule = shape.rule
    sink, part, keep = shape.sink_blocks, shape.part_blocks, shape.keep_blocks
    seq = np.asarray(seq_lens, dtype=np.int64)
    starts = np.asarray(query_start, dtype=np.int64)
    a = seq - (starts[1:] - starts[:-1])  # tokens cached before the step
    c0 = lagkv.compressed_partitions_each(a, rule)
    v_last = lagkv.compressed_partitions_each(np.maximum(a, seq - 1), rule)
    post = lagkv.compressed_partitions_each(seq, rule) > v_last
    pre = v_last - c0  # partitions each chunk compresses before attention
    requests = np.arange(len(seq))

    # Items: a request's chunk cut at each partition boundary (``lagkv.chunk_end_limit``) in it.
    first_cut = lagkv.chunk_end_limit_each(a, rule)
    cuts = np.maximum(0, -(-(seq - first_cut) // rule.lag))
    item_request, k = np.repeat(requests, cuts + 1), _within(cuts + 1)
    item_start = np.where(k == 0, a[item_request], first_cut[item_request] + (k - 1) * rule.lag)
    item_end = np.minimum(first_cut[item_request] + k * rule.lag, seq[item_request])
    v = lagkv.compressed_partitions_each(item_start, rule)

    # Columns: the sink, the kept columns of the v partitions the item sees compressed, then the
    # raw columns from partition v on; those rewritten before attention read their scratch copy.
    kept_end = sink + v * keep
    width = kept_end + -(-item_end // shape.block_size) - (sink + v * part)
    j = np.arange(max(int(width.max(initial=1)), 1))[None, :]
    columns = shape.live_column(j, v[:, None])
    p, offset = np.divmod(columns - sink, part)
    r = item_request[:, None]
    first_slot = (np.cumsum(pre) - pre)[r] * keep  # the request's first scratch block
    rewritten = (j >= kept_end[:, None]) & (c0[r] <= p) & (p < v_last[r]) & (offset < keep)
    columns = np.where(rewritten, -1 - (first_slot + (p - c0[r]) * keep + offset), columns)
    columns = np.where(j < width[:, None], columns, 0)

    pre_request = np.repeat(requests, pre)
    pre_partition = c0[pre_request] + _within(pre)
    spanning_post = post & (pre > 0)
    return ChunkItems(
        item_request, np.concatenate([starts[:1], starts[0] + np.cumsum(item_end - item_start)]),
        item_end - v * rule.evicted, columns,
        pre_request, pre_partition, requests[post], v_last[post],
        np.concatenate([pre_request, requests[spanning_post]]),
        np.concatenate([pre_partition, v_last[spanning_post]]),
    )  # fmt: skip


def _within(counts: np.ndarray) -> np.ndarray:
    """For groups of ``counts`` elements laid end to end, each element's index in its group."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
