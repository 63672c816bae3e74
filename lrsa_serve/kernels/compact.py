"""LagKV compact on the paged KV cache in Triton: the oracle is ``naive.compact_kept``.

Moves row ``kept[r, h, j]`` of partition ``part_blocks[r]`` to row ``j`` (j < keep), in place,
for every request r, KV head h, in the key and the value cache. Rows ``keep..L-1`` and every
other block are never written. One launch per layer (or per step: ``layer_offsets``), grid
``(R * H, 2 [K, V] * layers)``.

Why one program per (r, h, K/V) walking the kept slots in increasing order is race-free although
sources and destinations overlap: ``kept`` is strictly increasing from >= 0, so ``kept[j] >= j``.
A tile of slots ``[a, b)`` reads rows ``kept[a..b) >= a`` and writes rows ``[a, b)``; every later
tile reads rows ``>= b``, which no earlier tile wrote. Inside a tile a source row may be another
slot's destination, so all of the tile's loads finish (barrier) before any of its stores.
Different (r, h, K/V) programs touch disjoint memory (distinct blocks per request, disjoint
head / K-V slices), provided no block is shared between requests' partitions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrsa_serve.kernels.select import layer_shift, tile_tokens


@triton.jit
def _move_rows(
    cache_ptr,
    stride_blk,
    stride_head,
    stride_tok,
    stride_dim,
    part_row_ptr,
    kept_row_ptr,
    head,
    KEEP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    head_off = head.to(tl.int64) * stride_head
    dim_off = dims[None, :] * stride_dim
    for start in range(0, KEEP, BLOCK_J):
        slots = start + tl.arange(0, BLOCK_J)
        slot_ok = slots < KEEP
        src = tl.load(kept_row_ptr + slots, mask=slot_ok, other=0).to(tl.int32)
        # A kept row already in its slot needs no move (the leading rows often are).
        move = slot_ok & (src != slots)
        src_blk = tl.load(part_row_ptr + src // BLOCK_SIZE, mask=move, other=0).to(tl.int64)
        dst_blk = tl.load(part_row_ptr + slots // BLOCK_SIZE, mask=move, other=0).to(tl.int64)
        src_rows = src_blk * stride_blk + head_off + (src % BLOCK_SIZE) * stride_tok
        dst_rows = dst_blk * stride_blk + head_off + (slots % BLOCK_SIZE) * stride_tok
        ok = move[:, None] & dim_ok[None, :]
        rows = tl.load(cache_ptr + src_rows[:, None] + dim_off, mask=ok)
        # All of this tile's sources are read before any of its destinations is overwritten.
        tl.debug_barrier()
        tl.store(cache_ptr + dst_rows[:, None] + dim_off, rows, mask=ok)


@triton.jit
def _compact_kernel(
    k_ptr,
    k_stride_blk,
    k_stride_head,
    k_stride_tok,
    k_stride_dim,
    v_ptr,
    v_stride_blk,
    v_stride_head,
    v_stride_tok,
    v_stride_dim,
    part_ptr,
    part_stride_req,
    kept_ptr,
    kept_stride_req,
    kept_stride_head,
    kept_stride_layer,
    active_ptr,
    layer_ptr,
    num_heads,
    KEEP: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_JK: tl.constexpr,
    BLOCK_JV: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
    LAYERED: tl.constexpr,
):
    req_head = tl.program_id(0)
    which = tl.program_id(1) % 2  # 0: keys, 1: values
    layer = tl.program_id(1) // 2
    req = req_head // num_heads
    if HAS_ACTIVE:  # rows without a partition to compress this step do nothing
        if tl.load(active_ptr + req) == 0:
            return
    head = req_head % num_heads
    shift = layer_shift(layer_ptr, layer, LAYERED)
    part_row = part_ptr + req.to(tl.int64) * part_stride_req
    kept_row = (
        kept_ptr
        + layer.to(tl.int64) * kept_stride_layer
        + req.to(tl.int64) * kept_stride_req
        + head.to(tl.int64) * kept_stride_head
    )
    if which == 0:
        _move_rows(
            k_ptr + shift, k_stride_blk, k_stride_head, k_stride_tok, k_stride_dim, part_row,
            kept_row, head, KEEP, DK, BLOCK_SIZE, BLOCK_JK, BLOCK_DK,
        )  # fmt: skip
    else:
        _move_rows(
            v_ptr + shift, v_stride_blk, v_stride_head, v_stride_tok, v_stride_dim, part_row,
            kept_row, head, KEEP, DV, BLOCK_SIZE, BLOCK_JV, BLOCK_DV,
        )  # fmt: skip


def compact_kept(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    part_blocks: torch.Tensor,
    kept: torch.Tensor,
    active: torch.Tensor | None = None,
    layer_offsets: torch.Tensor | None = None,
) -> None:
    """Move each partition's kept rows, in order, to the front of its first ``keep/block_size``
    blocks, in place. ``kept``: ``[R, num_kv_heads, keep]`` strictly increasing indices < L
    (as ``select_kept`` returns them); the blocks of different requests must be distinct.
    ``active`` (``[R]`` int32, device): only rows with a non-zero entry move (see select).
    ``layer_offsets`` (see select): every layer at once, ``kept`` then ``[layers, R, H, keep]``."""
    num_blocks, num_heads, block_size, dim_k = key_cache.shape
    dim_v = value_cache.shape[-1]
    assert value_cache.shape[:3] == key_cache.shape[:3], "K and V caches must share blocks"
    layers = 1 if layer_offsets is None else layer_offsets.shape[0]
    if layer_offsets is None:
        kept = kept[None]
    assert kept.shape[0] == layers, "kept: one [R, H, keep] per layer"
    requests, _, keep = kept.shape[1:]
    assert kept.shape[2] == num_heads and part_blocks.shape[0] == requests
    assert keep % block_size == 0, "keep must be a multiple of the block size"
    if requests == 0 or keep == 0 or layers == 0:
        return
    part_blocks = part_blocks.contiguous()
    kept = kept.contiguous()
    block_dk, block_dv = triton.next_power_of_2(dim_k), triton.next_power_of_2(dim_v)
    _compact_kernel[(requests * num_heads, 2 * layers)](
        key_cache,
        *key_cache.stride(),
        value_cache,
        *value_cache.stride(),
        part_blocks,
        part_blocks.stride(0),
        kept,
        kept.stride(1),
        kept.stride(2),
        kept.stride(0),
        active if active is not None else kept,  # never read without HAS_ACTIVE
        layer_offsets if layer_offsets is not None else kept,  # never read without LAYERED
        num_heads,
        KEEP=keep,
        DK=dim_k,
        DV=dim_v,
        BLOCK_SIZE=block_size,
        BLOCK_JK=tile_tokens(dim_k, keep),
        BLOCK_JV=tile_tokens(dim_v, keep),
        BLOCK_DK=block_dk,
        BLOCK_DV=block_dv,
        HAS_ACTIVE=active is not None,
        LAYERED=layer_offsets is not None,
        num_warps=4,
    )
