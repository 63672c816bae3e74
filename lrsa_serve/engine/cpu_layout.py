"""Where vLLM's CPU attention keeps each (slot, channel) of a KV block.

Its cache write (``cpu_attn_reshape_and_cache``) stores a block's rows in an ISA-specific order,
e.g. keys channel-major for the "vec" kernels while values stay row-major. Rather than hard-code
each ISA, learn the order once per (ISA, dtype, block, head_dim) by writing a probe through the
same op, and move rows in logical order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch


@dataclass(frozen=True)
class PageOrder:
    """``logical_to_physical[i]`` is the offset inside a (block, head) page of logical element
    ``i = slot * head_dim + channel``; ``physical_to_logical`` is its inverse.

    ``transposed`` / ``identity`` name the two orders the stock ISAs use (keys channel-major,
    values row-major): those convert as views, since a gather along the last dim costs ~10x
    the rest of a compaction on CPU; any other order takes the general gather.
    """

    logical_to_physical: torch.Tensor
    physical_to_logical: torch.Tensor
    block_size: int
    identity: bool = False
    transposed: bool = False

    @classmethod
    def from_physical(cls, physical_to_logical: torch.Tensor, block_size: int) -> PageOrder:
        size = physical_to_logical.numel()
        rows = torch.arange(size)
        columns = rows.view(block_size, -1).t().flatten()
        return cls(
            torch.argsort(physical_to_logical),
            physical_to_logical,
            block_size,
            identity=torch.equal(physical_to_logical, rows),
            transposed=torch.equal(physical_to_logical, columns),
        )

    def to_logical(self, pages: torch.Tensor) -> torch.Tensor:
        """``[..., block*dim]`` physical pages -> ``[..., block, dim]`` rows (a view when the
        order is structured)."""
        if self.identity:
            return pages.unflatten(-1, (self.block_size, -1))
        if self.transposed:
            return pages.unflatten(-1, (-1, self.block_size)).transpose(-1, -2)
        return pages.index_select(-1, self.logical_to_physical).unflatten(-1, (self.block_size, -1))

    def to_physical(self, rows: torch.Tensor) -> torch.Tensor:
        """``[..., block, dim]`` rows -> ``[..., block*dim]`` physical pages."""
        if self.identity:
            return rows.flatten(-2)
        if self.transposed:
            return rows.transpose(-1, -2).flatten(-2)
        return rows.flatten(-2).index_select(-1, self.physical_to_logical)


def _probe(isa: str, dtype: torch.dtype, block_size: int, head_dim: int, fill) -> torch.Tensor:
    from vllm import _custom_ops as ops

    kv = torch.zeros(2, 1, block_size, 2 * head_dim, dtype=dtype)
    key_cache, value_cache = kv.view(2, 1, 2 * block_size, head_dim).chunk(2, dim=2)
    slot = torch.arange(block_size)[:, None, None].expand(block_size, 1, head_dim)
    chan = torch.arange(head_dim)[None, None, :].expand(block_size, 1, head_dim)
    values = fill(slot, chan).to(dtype)
    ops.cpu_attn_reshape_and_cache(
        values, values, key_cache, value_cache, torch.arange(block_size) + block_size, isa,
        k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
    )  # fmt: skip
    return torch.stack([key_cache[1, 0].flatten(), value_cache[1, 0].flatten()]).float()


@cache
def page_orders(
    isa: str, dtype: torch.dtype, block_size: int, head_dim: int
) -> tuple[PageOrder, PageOrder]:
    """(key order, value order). Slot and channel numbers up to 256 are exact in every float
    dtype the CPU backend stores, so two probes identify each element (larger heads fail loudly
    in the permutation check)."""
    slots = _probe(isa, dtype, block_size, head_dim, lambda s, c: s + 1) - 1
    chans = _probe(isa, dtype, block_size, head_dim, lambda s, c: c + 1) - 1
    orders = []
    for which in range(2):
        physical_to_logical = (slots[which] * head_dim + chans[which]).long()
        expected = torch.arange(block_size * head_dim)
        if not torch.equal(physical_to_logical.sort().values, expected):
            raise RuntimeError(f"unrecognised CPU KV layout (isa={isa}, dtype={dtype})")
        orders.append(PageOrder.from_physical(physical_to_logical, block_size))
    return orders[0], orders[1]
