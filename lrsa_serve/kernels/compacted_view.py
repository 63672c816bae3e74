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

from lrsa_serve import lagkv


@dataclass(frozen=True)
class ViewShape:
    """The rule in blocks of the paged cache."""

    rule: lagkv.Rule
    block_size: int

    @property
    def sink_blocks(self) -> int:
        return self.rule.sink // self.block_size

    @property
    def part_blocks(self) -> int:
        return self.rule.lag // self.block_size

    @property
    def keep_blocks(self) -> int:
        return self.rule.keep // self.block_size

    def live_columns(self, num_columns: int, compressed: torch.Tensor) -> torch.Tensor:
        """``[R, num_columns]`` logical column read by each physical column, for requests with
        ``compressed[r]`` partitions compressed (columns past a request's length: clamped)."""
        phys = torch.arange(num_columns, device=compressed.device)[None, :]
        done = ((phys - self.sink_blocks).clamp(min=0) // self.keep_blocks).clamp(
            max=compressed[:, None]
        )
        return (phys + done * (self.part_blocks - self.keep_blocks)).clamp(max=num_columns - 1)


@dataclass
class ViewBuffers:
    """Persistent outputs (rows = the batch capacity); the step writes their first rows."""

    table: torch.Tensor  # [rows, width] like vLLM's block table
    seq_lens: torch.Tensor  # [rows] int32
    part_blocks: torch.Tensor  # [rows, lag / block_size] int32
    ref_blocks: torch.Tensor  # [rows, lag / block_size] int32
    active: torch.Tensor  # [rows] int32


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
    before = lagkv.compressed_partitions_each(seq - query, shape.rule)
    active = lagkv.compressed_partitions_each(seq, shape.rule) > before

    table = block_table[:n]
    width = table.shape[1]
    torch.gather(table, 1, shape.live_columns(width, before), out=out.table[:n])
    out.seq_lens[: seq_lens.shape[0]].copy_(seq_lens)
    out.seq_lens[:n] -= (before * shape.rule.evicted).to(torch.int32)

    offsets = torch.arange(shape.part_blocks, device=table.device)
    part_cols = shape.sink_blocks + before[:, None] * shape.part_blocks + offsets
    torch.gather(table, 1, part_cols.clamp(max=width - 1), out=out.part_blocks[:n])
    ref_cols = part_cols + shape.part_blocks
    torch.gather(table, 1, ref_cols.clamp(max=width - 1), out=out.ref_blocks[:n])
    out.active[:n] = active.to(torch.int32)
    out.active[n : block_table.shape[0]] = 0
