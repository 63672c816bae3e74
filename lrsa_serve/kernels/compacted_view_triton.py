"""The Triton kernel of ``compacted_view``: one program per row of the batch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrsa_serve.kernels.compacted_view import ViewBuffers, ViewShape


@triton.jit
def _compressed(tokens, SINK: tl.constexpr, LAG: tl.constexpr):
    # Non-negative numerators only: integer division then truncates like the floor.
    past = tokens - SINK
    return tl.where(past >= 2 * LAG, tl.maximum(past, 0) // LAG - 1, 0)


# Row counts and the width change with the batch: specialising on them (== 1, divisible by 16)
# would compile new variants while vLLM captures CUDA graphs, where compiling cannot happen.
@triton.jit(do_not_specialize=["num_reqs", "table_rows", "seq_rows", "width"])
def _view_kernel(
    table_ptr,
    table_stride,
    seq_ptr,
    qsl_ptr,
    out_table_ptr,
    out_table_stride,
    out_seq_ptr,
    part_ptr,
    part_stride,
    ref_ptr,
    ref_stride,
    active_ptr,
    num_reqs,
    table_rows,
    seq_rows,
    width,
    SINK: tl.constexpr,
    LAG: tl.constexpr,
    EVICTED: tl.constexpr,
    SINK_BLOCKS: tl.constexpr,
    PART_BLOCKS: tl.constexpr,
    KEEP_BLOCKS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BLOCK_PART: tl.constexpr,
):
    r = tl.program_id(0)
    if r >= num_reqs:  # a captured batch's padding row: vLLM's length, nothing to compress
        if r < seq_rows:
            tl.store(out_seq_ptr + r, tl.load(seq_ptr + r))
        if r < table_rows:
            tl.store(active_ptr + r, 0)
        return
    seq = tl.load(seq_ptr + r)
    query = tl.load(qsl_ptr + r + 1) - tl.load(qsl_ptr + r)
    before = _compressed(seq - query, SINK, LAG)
    after = _compressed(seq, SINK, LAG)
    tl.store(out_seq_ptr + r, (seq - before * EVICTED).to(tl.int32))
    tl.store(active_ptr + r, (after > before).to(tl.int32))

    row = table_ptr + r.to(tl.int64) * table_stride
    out_row = out_table_ptr + r.to(tl.int64) * out_table_stride
    for start in range(0, width, BLOCK_COLS):
        cols = start + tl.arange(0, BLOCK_COLS)
        ok = cols < width
        done = tl.minimum(tl.maximum(cols - SINK_BLOCKS, 0) // KEEP_BLOCKS, before)
        live = tl.minimum(cols + done * (PART_BLOCKS - KEEP_BLOCKS), width - 1)
        tl.store(out_row + cols, tl.load(row + live, mask=ok, other=0), mask=ok)

    offsets = tl.arange(0, BLOCK_PART)
    part_ok = offsets < PART_BLOCKS
    part_cols = SINK_BLOCKS + before * PART_BLOCKS + offsets
    part = tl.load(row + tl.minimum(part_cols, width - 1), mask=part_ok, other=0)
    ref = tl.load(row + tl.minimum(part_cols + PART_BLOCKS, width - 1), mask=part_ok, other=0)
    tl.store(part_ptr + r.to(tl.int64) * part_stride + offsets, part, mask=part_ok)
    tl.store(ref_ptr + r.to(tl.int64) * ref_stride + offsets, ref, mask=part_ok)


def compacted_view(
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    num_reqs: int,
    shape: ViewShape,
    out: ViewBuffers,
) -> None:
    """One launch writing what ``compacted_view_torch`` writes (CUDA tensors, or CPU tensors
    under Triton's interpreter)."""
    table_rows, width = block_table.shape
    seq_rows = seq_lens.shape[0]
    assert block_table.stride(1) == 1 and out.table.stride(1) == 1
    assert out.part_blocks.stride(1) == 1 and out.ref_blocks.stride(1) == 1
    assert out.table.shape[1] == width and out.table.dtype == block_table.dtype
    rows = max(table_rows, seq_rows)
    if rows == 0:
        return
    _view_kernel[(rows,)](
        block_table, block_table.stride(0), seq_lens, query_start_loc,
        out.table, out.table.stride(0), out.seq_lens, out.part_blocks, out.part_blocks.stride(0),
        out.ref_blocks, out.ref_blocks.stride(0), out.active,
        num_reqs, table_rows, seq_rows, width,
        SINK=shape.rule.sink, LAG=shape.rule.lag, EVICTED=shape.rule.evicted,
        SINK_BLOCKS=shape.sink_blocks, PART_BLOCKS=shape.part_blocks, KEEP_BLOCKS=shape.keep_blocks,
        BLOCK_COLS=min(1024, triton.next_power_of_2(max(width, 1))),
        BLOCK_PART=triton.next_power_of_2(shape.part_blocks), num_warps=4,
    )  # fmt: skip
