"""The CUDA builders' compacted view and plan (``engine.device_view``), on CPU tensors: what
attention reads and what compaction moves, checked request by request against the LagKV
accounting, and written into the same buffers every step (what a captured graph replays)."""

from __future__ import annotations

import pytest
import torch

from lrsa_serve import lagkv
from lrsa_serve.config import LagKVConfig
from lrsa_serve.engine.device_view import DeviceView, host_view
from lrsa_serve.engine.layout import BlockGeometry, MisalignedChunkError

CFG = LagKVConfig(sink=16, lag=64, ratio=0.25)
GEO = BlockGeometry.of(CFG, 16)
WIDTH = 40  # block-table columns: up to 640 tokens


def live_columns(context: int) -> list[int]:
    """Logical block columns a request reads after ``context`` tokens, written out."""
    compressed = lagkv.compressed_partitions(context, CFG.rule)
    cols = list(range(GEO.sink_blocks))
    for part in range(compressed):
        cols += list(GEO.partition_columns(part))[: GEO.keep_blocks]
    start = GEO.sink_blocks + compressed * GEO.part_blocks
    return cols + list(range(start, WIDTH))


# (tokens before the step, tokens this step): decode, first chunk, later chunks, padding rows.
BATCH = [(400, 1), (0, 144), (144, 64), (463, 1), (208, 64), (80, 1), (0, 0), (0, 0)]


def step_tensors(batch, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows = len(batch)
    table = torch.randperm(rows * WIDTH, generator=gen)[: rows * WIDTH].view(rows, WIDTH).int()
    seq = torch.tensor([c + q for c, q in batch], dtype=torch.int32)
    starts = torch.tensor([0] + [q for _, q in batch], dtype=torch.int32).cumsum(0).int()
    return table, seq, starts


def test_view_and_plan_follow_the_accounting():
    view = DeviceView(GEO, max_reqs=12, device=torch.device("cpu"))
    table, seq, starts = step_tensors(BATCH)
    n = 6  # the last two rows are a captured batch's padding
    compact, lengths = view.update(table, seq, starts, n)
    host = host_view(GEO, seq, starts, n, fallback_max_seq_len=0)
    plan = view.plan(compact.shape[0], host)
    assert compact.shape == table.shape and lengths.shape == seq.shape

    for r, (context, query) in enumerate(BATCH[:n]):
        cols = live_columns(context)
        resident = lagkv.resident_tokens(context, CFG.rule) + query
        assert int(lengths[r]) == resident
        used = -(-resident // GEO.block_size)
        assert compact[r, :used].tolist() == table[r, cols[:used]].tolist(), r
        before = lagkv.compressed_partitions(context, CFG.rule)
        compresses = lagkv.compressed_partitions(context + query, CFG.rule) > before
        assert bool(plan.active[r]) == compresses, r
        if compresses:
            part = list(GEO.partition_columns(before))
            ref = list(GEO.partition_columns(before + 1))
            assert plan.part_blocks[r].tolist() == table[r, part].tolist()
            assert plan.ref_blocks[r].tolist() == table[r, ref].tolist()
    assert plan.active[n:].tolist() == [0] * (len(BATCH) - n)
    assert host.compressing == int(plan.active.sum()) == 4 and plan.launch
    assert host.max_seq_len == int(lengths[:n].max())


def test_buffers_are_reused_across_steps():
    view = DeviceView(GEO, max_reqs=12, device=torch.device("cpu"))
    table, seq, starts = step_tensors(BATCH)
    first = view.update(table, seq, starts, 6)
    plan = view.plan(first[0].shape[0], None)
    table2, seq2, starts2 = step_tensors([(c + q, 1) for c, q in BATCH[:6]] + BATCH[6:], seed=1)
    second = view.update(table2, seq2, starts2, 6)
    plan2 = view.plan(second[0].shape[0], None)
    for a, b in [*zip(first, second, strict=True), (plan.active, plan2.active),
                 (plan.part_blocks, plan2.part_blocks)]:  # fmt: skip
        assert a.data_ptr() == b.data_ptr()
    assert plan2.launch  # no host view: always launch


def test_a_step_without_compression_launches_nothing_eagerly():
    view = DeviceView(GEO, max_reqs=4, device=torch.device("cpu"))
    batch = [(100, 1), (0, 32)]
    table, seq, starts = step_tensors(batch)
    view.update(table, seq, starts, 2)
    host = host_view(GEO, seq, starts, 2, 0)
    assert host.compressing == 0 and not view.plan(2, host).launch


def test_misaligned_chunk_is_refused():
    table, seq, starts = step_tensors([(100, 64)])  # 100..163 crosses the boundary at 144
    with pytest.raises(MisalignedChunkError):
        host_view(GEO, seq, starts, 1, 0)
