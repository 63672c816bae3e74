"""A step's compacted view of the paged cache, written into persistent buffers: one Triton launch
on CUDA (``compacted_view_triton.compacted_view``), its plain-torch reference here
(``compacted_view_torch``).

Per request row r of the step (``num_reqs`` real rows, then a captured batch's padding rows):

- ``before`` = partitions compressed before this step's tokens, ``after`` = after them;
- ``out_table[r]``: the block table with the evicted columns of the ``before`` compressed
  partitions dropped (a compressed partition keeps its first ``keep / block_size`` columns);
- ``out_seq_lens[r]``: the physical length, ``seq_lens[r] - before * (lag - keep)``;
- ``out_part[r]`` / ``out_ref[r]``: the blocks of partition ``before`` and of its successor,
  ``out_active[r]`` = ``after > before`` (the step completes partition ``before + 1``).

Padding rows keep vLLM's length and are inactive. Columns past a request's length are
don't-care: attention stops at the length. The host path of the builder issued ~25 small
device ops for this; one launch keeps the step's host time down.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ViewShape:
    """The LagKV geometry the view needs, in tokens and blocks."""

    sink: int
    lag: int
    keep: int
    block_size: int

    @property
    def sink_blocks(self) -> int:
        return self.sink // self.block_size

    @property
    def part_blocks(self) -> int:
        return self.lag // self.block_size

    @property
    def keep_blocks(self) -> int:
        return self.keep // self.block_size


@dataclass
class ViewBuffers:
    """Persistent outputs (rows = the batch capacity); the step writes their first rows."""

    table: torch.Tensor  # [rows, width] like vLLM's block table
    seq_lens: torch.Tensor  # [rows] int32
    part_blocks: torch.Tensor  # [rows, lag / block_size] int32
    ref_blocks: torch.Tensor  # [rows, lag / block_size] int32
    active: torch.Tensor  # [rows] int32


def _compressed(tokens: torch.Tensor, shape: ViewShape) -> torch.Tensor:
    return ((tokens - shape.sink) // shape.lag - 1).clamp(min=0)


def compacted_view_torch(
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    num_reqs: int,
    shape: ViewShape,
    out: ViewBuffers,
) -> None:
    """The reference: the same outputs from torch ops (any device)."""
    n = num_reqs
    seq = seq_lens[:n].long()
    query = (query_start_loc[1 : n + 1] - query_start_loc[:n]).long()
    before = _compressed(seq - query, shape)
    active = _compressed(seq, shape) > before

    table = block_table[:n]
    width = table.shape[1]
    phys = torch.arange(width, device=table.device)[None, :]
    done = ((phys - shape.sink_blocks).clamp(min=0) // shape.keep_blocks).clamp(max=before[:, None])
    live = (phys + done * (shape.part_blocks - shape.keep_blocks)).clamp(max=width - 1)
    torch.gather(table, 1, live, out=out.table[:n])
    out.seq_lens[: seq_lens.shape[0]].copy_(seq_lens)
    out.seq_lens[:n] -= (before * (shape.lag - shape.keep)).to(torch.int32)

    offsets = torch.arange(shape.part_blocks, device=table.device)
    part_cols = shape.sink_blocks + before[:, None] * shape.part_blocks + offsets
    torch.gather(table, 1, part_cols.clamp(max=width - 1), out=out.part_blocks[:n])
    ref_cols = part_cols + shape.part_blocks
    torch.gather(table, 1, ref_cols.clamp(max=width - 1), out=out.ref_blocks[:n])
    out.active[:n] = active.to(torch.int32)
    out.active[n : block_table.shape[0]] = 0
