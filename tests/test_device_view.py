"""The CUDA builders' compacted view and plan (``engine.device_view``), on CPU tensors: what
attention reads and what compaction moves, checked request by request against the LagKV
accounting, and written into the same buffers every step (what a captured graph replays)."""

from __future__ import annotations

import torch

from lrsa_serve import lagkv
from lrsa_serve.config import LagKVConfig
from lrsa_serve.engine.device_view import DeviceView, host_view
from lrsa_serve.engine.layout import BlockGeometry

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


def test_the_host_view_tells_chunks_that_span_partitions():
    # 100..163 compresses partition 0 at 144, before its last token: items (chunk_items);
    # 100..143 compresses it with its last token: the device view, compaction after attention.
    spanning, ending = (host_view(GEO, *step_tensors([batch])[1:], 1, 0) for batch in
                        [(100, 64), (100, 44)])  # fmt: skip
    assert spanning.spans and spanning.compressing == 1
    assert not ending.spans and ending.compressing == 1


def test_items_keep_each_tensor_on_its_device():
    # vLLM's CUDA model runner keeps is_prefilling on the host and the block table on the GPU;
    # "meta" stands in for the GPU here. A chunk of 300 tokens spans partitions, beside a decode.
    from types import SimpleNamespace

    from vllm.v1.attention.backend import CommonAttentionMetadata

    from lrsa_serve.engine.backend import LagKVBuilderMixin

    meta = torch.device("meta")
    builder = object.__new__(LagKVBuilderMixin)
    builder.geometry, builder.view, builder._scratch = GEO, DeviceView(GEO, 4, meta), None
    builder.vllm_config = SimpleNamespace(
        cache_config=SimpleNamespace(num_gpu_blocks=4096),
        scheduler_config=SimpleNamespace(max_num_batched_tokens=2048),
    )
    seq = torch.tensor([300, 401], dtype=torch.int32)
    starts = torch.tensor([0, 300, 301], dtype=torch.int32)
    cm = CommonAttentionMetadata(
        query_start_loc=starts.to(meta), query_start_loc_cpu=starts, seq_lens=seq.to(meta),
        num_reqs=2, num_actual_tokens=301, max_query_len=300, max_seq_len=401,
        block_table_tensor=torch.zeros(2, WIDTH, dtype=torch.int32, device=meta),
        slot_mapping=torch.zeros(301, dtype=torch.int64, device=meta),
        is_prefilling=torch.tensor([True, False]), seq_lens_cpu_upper_bound=seq,
    )  # fmt: skip
    view, _, pre = builder.lagkv_view(cm)
    # 300 tokens from 0: items up to S + 2L = 144, then one per partition of 64; the decode.
    assert view.query_start_loc_cpu.tolist() == [0, 144, 208, 272, 300, 301]
    assert view.is_prefilling.tolist() == [True] * 4 + [False]  # on the host, as given
    assert view.block_table_tensor.device == meta and view.seq_lens.device == meta
    assert len(pre.plan.part_blocks) == 3  # partitions 0-2 compress inside the chunk
