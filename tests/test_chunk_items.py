"""``engine/chunk_items``: the items of a step with multi-partition chunks see exactly what the
visibility rule shows each query, on a simulated paged cache (positions for contents, a fixed
selection per partition), whatever the chunking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrsa_serve import lagkv
from lrsa_serve.engine.chunk_items import pre_partitions, split_chunks
from lrsa_serve.kernels.compacted_view import ViewShape

RULE = lagkv.Rule(sink=4, lag=8, keep=2)
SHAPE = ViewShape(RULE, block_size=2)


def kept_of(partition: int) -> list[int]:
    """A fixed selection: the kept offsets of a partition (any subset works for the view)."""
    rng = np.random.default_rng(partition)
    return sorted(rng.choice(RULE.lag, RULE.keep, replace=False).tolist())


class SimulatedRequest:
    """Block contents as token positions; compaction as the engine does it."""

    def __init__(self, length: int) -> None:
        cols = -(-length // SHAPE.block_size)
        self.blocks = list(range(100 * cols, 101 * cols))  # physical ids, one per column
        self.cache: dict[int, list[int]] = {}  # physical block -> positions
        self.length = length

    def write(self, start: int, end: int) -> None:
        b = SHAPE.block_size
        for t in range(start, end):
            self.cache.setdefault(self.blocks[t // b], [-1] * b)[t % b] = t

    def compact(self, partition: int) -> None:
        b = SHAPE.block_size
        first = SHAPE.sink_blocks + partition * SHAPE.part_blocks
        start = lagkv.partition_start(partition, RULE)
        kept = [start + k for k in kept_of(partition)]
        for j in range(SHAPE.keep_blocks):
            self.cache[self.blocks[first + j]] = kept[j * b : (j + 1) * b]


def visible(q: int) -> set[int]:
    """The rule's keys of query position q."""
    parts = lagkv.compressed_partitions(q, RULE) + 1  # every selection a longer sequence makes
    kept = torch.tensor([[lagkv.partition_start(p, RULE) + k for k in kept_of(p)]
                         for p in range(parts)])  # fmt: skip
    mask = lagkv.visibility_mask(q + 1, kept.reshape(parts, RULE.keep), RULE, query_start=q)
    return set(torch.nonzero(mask[0]).flatten().tolist())


@pytest.mark.parametrize("chunks", [[64], [5, 40, 19], [12, 8, 8, 36], [1] * 30 + [34], [31, 33]])
def test_items_see_what_the_rule_shows(chunks):
    request = SimulatedRequest(sum(chunks))
    scratch: dict[int, list[int]] = {}
    done = 0
    for chunk in chunks:
        seq = done + chunk
        items = split_chunks(np.array([seq]), np.array([0, chunk]), SHAPE)
        assert len(items.pre_partition) == pre_partitions(done, seq, RULE)
        request.write(done, seq)
        # Copied: the partitions compacted before attention, then, in a spanning chunk, the one
        # its last token completes (written by the chunk too: the prefix cache copies it out).
        spans = len(items.pre_partition) > 0
        assert list(items.copy_partition) == [*items.pre_partition] + (
            [*items.post_partition] if spans else []
        )
        for k, p in enumerate(items.copy_partition):  # before attention: copy, then compact
            first = SHAPE.sink_blocks + p * SHAPE.part_blocks
            for j in range(SHAPE.keep_blocks):
                scratch[k * SHAPE.keep_blocks + j] = request.cache[request.blocks[first + j]]
        for p in items.pre_partition:
            request.compact(int(p))
        for i in range(items.num_items):
            row = items.columns[i]
            seen = []
            for col in row:
                block = scratch[-1 - col] if col < 0 else request.cache.get(request.blocks[col])
                seen += block or [-1] * SHAPE.block_size
            seen = seen[: items.seq_lens[i]]
            queries = range(items.query_start[i], items.query_start[i + 1])
            for offset in queries:  # causal, aligned bottom-right
                q = done + offset
                keys = seen[: len(seen) - (items.query_start[i + 1] - 1 - offset)]
                assert set(keys) == visible(q), (chunks, q)
                assert len(keys) == len(set(keys))
        for p in items.post_partition:  # after attention
            request.compact(int(p))
        done = seq
