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

    def __init__(self, length: int, base: int = 0) -> None:
        cols = -(-length // SHAPE.block_size)
        self.blocks = list(range(base, base + cols))  # physical ids, one per column
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


def run_steps(chunkings: list[list[int]]) -> None:
    """Requests stepped together: step s attends each request's s-th chunk (if it has one)."""
    requests = [SimulatedRequest(sum(c), base=1000 * r) for r, c in enumerate(chunkings)]
    done = [0] * len(requests)
    for step in range(max(map(len, chunkings))):
        rows = [r for r, c in enumerate(chunkings) if step < len(c)]
        chunk = [chunkings[r][step] for r in rows]
        seq = np.array([done[r] + n for r, n in zip(rows, chunk, strict=True)])
        items = split_chunks(seq, np.concatenate([[0], np.cumsum(chunk)]), SHAPE)
        pre = [pre_partitions(done[r], int(s), RULE) for r, s in zip(rows, seq, strict=True)]
        assert list(items.pre_request) == [i for i, n in enumerate(pre) for _ in range(n)]
        # Copied: the partitions compacted before attention, then, of each spanning chunk, the
        # one its last token completes (written by the chunk too: the prefix cache copies it).
        spanning = [i for i in items.post_request if pre[i]]
        assert list(items.copy_request) == [*items.pre_request, *spanning]
        for i, r in enumerate(rows):
            requests[r].write(done[r], int(seq[i]))
        scratch: dict[int, list[int]] = {}
        for k, (i, p) in enumerate(zip(items.copy_request, items.copy_partition, strict=True)):
            request = requests[rows[i]]  # before attention: copy, then compact
            first = SHAPE.sink_blocks + p * SHAPE.part_blocks
            for j in range(SHAPE.keep_blocks):
                scratch[k * SHAPE.keep_blocks + j] = request.cache[request.blocks[first + j]]
        for i, p in zip(items.pre_request, items.pre_partition, strict=True):
            requests[rows[i]].compact(int(p))
        for item in range(items.num_items):
            i = items.item_request[item]
            request, start, own = requests[rows[i]], int(seq[i] - chunk[i]), sum(chunk[:i])
            seen = []
            for col in items.columns[item]:
                block = scratch[-1 - col] if col < 0 else request.cache.get(request.blocks[col])
                seen += block or [-1] * SHAPE.block_size
            seen = seen[: items.seq_lens[item]]
            end = items.query_start[item + 1]
            for offset in range(items.query_start[item], end):  # causal, aligned bottom-right
                q = start + offset - own
                keys = seen[: len(seen) - (end - 1 - offset)]
                assert set(keys) == visible(q), (chunkings, q)
                assert len(keys) == len(set(keys))
        for i, p in zip(items.post_request, items.post_partition, strict=True):
            requests[rows[i]].compact(int(p))  # after attention
        for i, r in enumerate(rows):
            done[r] = int(seq[i])


@pytest.mark.parametrize("chunks", [[64], [5, 40, 19], [12, 8, 8, 36], [1] * 30 + [34], [31, 33]])
def test_items_see_what_the_rule_shows(chunks):
    run_steps([chunks])


def test_a_batch_of_chunks_and_decodes_sees_what_the_rule_shows():
    # Spanning and single-partition chunks and one-token steps, side by side.
    run_steps([[40, 1, 1, 1, 20], [5, 40, 19, 1], [30, 8, 36], [1] * 6 + [30, 3]])
