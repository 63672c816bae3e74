"""LagKV select on the paged KV cache in Triton: the oracle is ``naive.select_kept``.

For each request r and KV head h, score partition p (``part_blocks[r]``) against partition p+1
(``ref_blocks[r]``), both read through their block ids straight from the cache, and return the
``keep`` best token indices, increasing, ties to the lower position. Three launches per layer,
or for all layers of a step at once (``layer_offsets``), each covering all R requests, the first
two over grid ``(R * H, 2 [K, V] * layers, splits)``: splitting the L tokens of a (request, head)
keeps the GPU busy when R is small (decode batch 1), and with R large there is one split and
each launch reads its partition once.

1. ``_channels_kernel`` with ``RANGES``: per-channel min/max over a slice of partition p+1's
   tokens (partial ranges; min/max are exact, so combining them in any order is exact).
2. ``_channels_kernel``: combine the partial ranges, then ``std`` over channels of the min-max
   normalised tokens of a slice of partition p -> ``spread[R, H, 2, L]`` float32.
3. ``_top_keep_kernel``, grid ``(R * H,)``: softmax of both spreads, ``score = s_K + ratio * s_V``
   in float32, then an exact top-``keep``: the keep-th largest score is found by a radix search
   on its order-preserving integer key (8 radix-16 counting steps over L registers, no sort),
   ties at that threshold go to the lowest positions, and a prefix sum gives each kept token its
   output slot.

Arithmetic follows ``lagkv.channel_spread_score`` as closely as it can, so indices match exactly
in practice: min/max are exact, ``z = (x - min) / span`` uses IEEE division (Triton's plain ``/``
on float32 is a 2-ulp approximation), and the std and softmax accumulate in float64 and round
once (torch on the CPU accumulates the std in float64 too, so spreads agree bit for bit there).
Scores still differ from torch's in the last ulp through the softmax, so two tokens whose
reference scores are within a few ulps at the keep boundary may swap; ``tests`` document that.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from lrsa_serve.lagkv import ZERO_SPAN_EPS

# Triton picks the interpreter or the compiler when a kernel is decorated, i.e. when this module
# is imported: CPU tensors can only run these kernels if TRITON_INTERPRET=1 was set by then.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Globals read inside a kernel must be constexpr.
_ZERO_SPAN_EPS = tl.constexpr(ZERO_SPAN_EPS)

# Elements of one [tokens, head_dim] tile: 16 per thread at 8 warps keeps the float64 temporaries
# out of local memory while a tile still moves 8 KB (bf16) per load.
TILE_ELEMENTS = 4096
SPREAD_WARPS = 8
# Most token slices per (request, head, K/V) when R is small.
MAX_SPLITS = 16


@triton.jit
def _load_tile(
    cache_ptr,
    row_ptr,
    start,
    end,
    head_off,
    stride_blk,
    stride_tok,
    dim_off,
    dim_ok,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Tokens [start, min(start + BLOCK_T, end)) of a partition, through its block ids: a
    [BLOCK_T, BLOCK_D] tile in the cache's dtype, zeros where masked."""
    toks = start + tl.arange(0, BLOCK_T)
    tok_ok = toks < end
    blk = tl.load(row_ptr + toks // BLOCK_SIZE, mask=tok_ok, other=0).to(tl.int64)
    rows = blk * stride_blk + head_off + (toks % BLOCK_SIZE) * stride_tok
    ok = tok_ok[:, None] & dim_ok[None, :]
    return tl.load(cache_ptr + rows[:, None] + dim_off, mask=ok, other=0.0)


@triton.jit
def _channel_pass(
    cache_ptr,
    stride_blk,
    stride_head,
    stride_tok,
    stride_dim,
    row_ptr,
    range_ptr,
    spread_ptr,
    head,
    splits,
    tok_begin,
    tok_end,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RANGE_W: tl.constexpr,
    RANGES: tl.constexpr,
):
    """Tokens [tok_begin, tok_end) of the partition whose block ids are at row_ptr. RANGES: their
    per-channel min and max (partition p+1), the min at range_ptr[:D], the max at
    range_ptr[RANGE_W:RANGE_W + D]. Else: std over channels of (x - min) / span (partition p) into
    spread_ptr, the range being the min/max of the ``splits`` partial ranges at range_ptr."""
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    head_off = head.to(tl.int64) * stride_head
    dim_off = dims[None, :] * stride_dim
    if RANGES:
        # Elementwise running min/max, reduced across tokens once at the end: a cross-warp
        # reduction per tile would put a shared-memory round trip and a barrier into every
        # iteration.
        lo = tl.full([BLOCK_T, BLOCK_D], float("inf"), tl.float32)
        hi = tl.full([BLOCK_T, BLOCK_D], float("-inf"), tl.float32)
    else:
        # min/max are exact, so combining the splits' partial ranges in any order is exact.
        lo = tl.full([BLOCK_D], float("inf"), tl.float32)
        hi = tl.full([BLOCK_D], float("-inf"), tl.float32)
        for split in range(splits):
            lo = tl.minimum(lo, tl.load(range_ptr + split * 2 * RANGE_W + dims))
            hi = tl.maximum(hi, tl.load(range_ptr + split * 2 * RANGE_W + RANGE_W + dims))
        span = hi - lo
        span = tl.where(span == 0, _ZERO_SPAN_EPS, span)
        span = tl.where(dim_ok, span, 1.0)  # padded channels: keep them finite, masked below
        lo = tl.where(dim_ok, lo, 0.0)

    x_next = _load_tile(
        cache_ptr, row_ptr, tok_begin, tok_end, head_off, stride_blk, stride_tok, dim_off, dim_ok,
        BLOCK_SIZE, BLOCK_T,
    )  # fmt: skip
    for start in range(tok_begin, tok_end, BLOCK_T):
        x = x_next.to(tl.float32)
        # The next tile's loads are issued before this tile's arithmetic (the spread is nearly
        # compute-bound): two tiles in flight per program instead of one.
        x_next = _load_tile(
            cache_ptr, row_ptr, start + BLOCK_T, tok_end, head_off, stride_blk, stride_tok,
            dim_off, dim_ok, BLOCK_SIZE, BLOCK_T,
        )  # fmt: skip
        toks = start + tl.arange(0, BLOCK_T)
        tok_ok = toks < tok_end
        ok = tok_ok[:, None] & dim_ok[None, :]
        if RANGES:
            lo = tl.minimum(lo, tl.where(ok, x, float("inf")))
            hi = tl.maximum(hi, tl.where(ok, x, float("-inf")))
        else:
            # Same float32 ops as torch: (x - lo) then an IEEE division.
            z = tl.div_rn(x - lo[None, :], span[None, :])
            z = tl.where(ok, z.to(tl.float64), 0.0)
            # Two-pass in float64: exact enough that rounding the std to float32 matches torch's
            # float64 Welford on the CPU, and robust when a zero-span channel makes z huge.
            mean = tl.sum(z, axis=1) / D
            dev = tl.where(ok, z - mean[:, None], 0.0)
            std = tl.sqrt(tl.sum(dev * dev, axis=1) / (D - 1))
            tl.store(spread_ptr + toks, std.to(tl.float32), mask=tok_ok)
    if RANGES:
        tl.store(range_ptr + dims, tl.min(lo, axis=0))
        tl.store(range_ptr + RANGE_W + dims, tl.max(hi, axis=0))


@triton.jit
def layer_shift(layer_ptr, layer, LAYERED: tl.constexpr):
    """Element offset of this program's layer cache from the caches passed in (0: one layer)."""
    shift = layer.to(tl.int64) * 0  # one int64 type on both paths (Triton checks returns)
    if LAYERED:
        shift = tl.load(layer_ptr + layer).to(tl.int64)
    return shift


@triton.jit
def _channels_kernel(
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
    blocks_ptr,
    blocks_stride_req,
    range_ptr,
    spread_ptr,
    active_ptr,
    layer_ptr,
    num_heads,
    split_tokens,
    L: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_TK: tl.constexpr,
    BLOCK_TV: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    RANGE_W: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
    LAYERED: tl.constexpr,
    RANGES: tl.constexpr,
):
    """``_channel_pass`` of one (request * head, K/V + 2 * layer, split): RANGES over the
    reference partition's blocks, else the spread over the scored partition's."""
    req_head = tl.program_id(0)
    which = tl.program_id(1) % 2  # 0: keys, 1: values
    layer = tl.program_id(1) // 2
    split = tl.program_id(2)
    splits = tl.num_programs(2)
    req = req_head // num_heads
    if HAS_ACTIVE:  # rows without a partition to compress this step do nothing
        if tl.load(active_ptr + req) == 0:
            return
    head = req_head % num_heads
    shift = layer_shift(layer_ptr, layer, LAYERED)
    tok_begin = split * split_tokens
    tok_end = tl.minimum(tok_begin + split_tokens, L)
    blocks_row = blocks_ptr + req.to(tl.int64) * blocks_stride_req
    row = layer.to(tl.int64) * tl.num_programs(0) + req_head
    ranges = range_ptr + (row * 2 + which) * splits * 2 * RANGE_W
    if RANGES:  # this split's partial range
        ranges += split * 2 * RANGE_W
    out = spread_ptr + (row * 2 + which) * L
    if which == 0:
        _channel_pass(
            k_ptr + shift, k_stride_blk, k_stride_head, k_stride_tok, k_stride_dim, blocks_row,
            ranges, out, head, splits, tok_begin, tok_end, DK, BLOCK_SIZE, BLOCK_TK, BLOCK_DK,
            RANGE_W, RANGES,
        )  # fmt: skip
    else:
        _channel_pass(
            v_ptr + shift, v_stride_blk, v_stride_head, v_stride_tok, v_stride_dim, blocks_row,
            ranges, out, head, splits, tok_begin, tok_end, DV, BLOCK_SIZE, BLOCK_TV, BLOCK_DV,
            RANGE_W, RANGES,
        )  # fmt: skip


@triton.jit
def _softmax_f32(spread, tok_ok):
    """softmax over the valid tokens, accumulated in float64 and rounded once to float32."""
    spread = tl.where(tok_ok, spread, float("-inf"))
    peak = tl.max(spread, axis=0)
    e = tl.exp(spread.to(tl.float64) - peak.to(tl.float64))
    e = tl.where(tok_ok, e, 0.0)
    return (e / tl.sum(e, axis=0)).to(tl.float32)


@triton.jit
def _top_keep_kernel(
    spread_ptr,
    kept_ptr,
    scores_ptr,
    active_ptr,
    num_heads,
    score_v_ratio,
    L: tl.constexpr,
    KEEP: tl.constexpr,
    BLOCK_L: tl.constexpr,
    WRITE_SCORES: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
):
    req_head = tl.program_id(0)
    if HAS_ACTIVE:  # rows without a partition to compress this step do nothing
        if tl.load(active_ptr + req_head // num_heads) == 0:
            return
    # One program per (layer, request, head): grid axis 1 is the layer.
    layer_row = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + req_head
    toks = tl.arange(0, BLOCK_L)
    tok_ok = toks < L
    row = spread_ptr + layer_row * 2 * L
    s_k = _softmax_f32(tl.load(row + toks, mask=tok_ok, other=0.0), tok_ok)
    s_v = _softmax_f32(tl.load(row + L + toks, mask=tok_ok, other=0.0), tok_ok)
    # float32 like torch: ratio * s_V rounded, then the sum rounded. "+ 0.0" turns a -0.0 (only
    # possible with a negative ratio) into +0.0 so that it ties with +0.0 as in torch.sort.
    score = s_k + score_v_ratio * s_v + 0.0
    if WRITE_SCORES:
        tl.store(scores_ptr + layer_row * L + toks, score, mask=tok_ok)

    # Order-preserving integer key: positive floats order like their bits; negative ones reversed.
    bits = score.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)

    # Radix search for the keep-th largest key T, 4 bits per step: [lo, lo + 16 * width) always
    # holds T, i.e. count(key >= lo) >= KEEP > count(key >= lo + 16 * width). Each step counts
    # the keys above 16 evenly spaced thresholds at once and keeps the highest sub-interval that
    # still has KEEP keys at or above it; 8 steps cover the 32 bits and leave T = lo exactly
    # (no sort, no tie lost). 8 block-wide reductions in a row instead of bisection's 32.
    lo = tl.zeros([1], dtype=tl.int64) - 2147483648
    digits = tl.arange(0, 16)
    for level in tl.static_range(8):
        step = digits.to(tl.int64) << (28 - 4 * level)  # the 16 thresholds' offsets from lo
        above_thr = tok_ok[None, :] & (key[None, :] >= lo + step[:, None])
        counts = tl.sum(above_thr.to(tl.int32), axis=1)
        digit = tl.max(tl.where(counts >= KEEP, digits, 0), axis=0)
        lo = lo + (digit.to(tl.int64) << (28 - 4 * level))

    above = tok_ok & (key > lo)
    tie = tok_ok & (key == lo)
    # Every token above T is kept (fewer than KEEP of them); the rest come from the ties at T,
    # lowest positions first, as torch.sort(stable=True) does.
    free = KEEP - tl.sum(above.to(tl.int32), axis=0)
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=0) - 1
    kept = above | (tie & (tie_rank < free))
    slot = tl.cumsum(kept.to(tl.int32), axis=0) - 1
    tl.store(kept_ptr + layer_row * KEEP + slot, toks.to(tl.int64), mask=kept)


def tile_tokens(head_dim: int, length: int) -> int:
    """Rows of one [rows, head_dim] tile of at most ``TILE_ELEMENTS``, no more than ``length``."""
    block_d = triton.next_power_of_2(head_dim)
    return max(1, min(TILE_ELEMENTS // block_d, triton.next_power_of_2(length)))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_splits(device: torch.device, programs: int, length: int, tile_rows: int) -> int:
    """Token slices per (request, head, K/V): enough programs for two waves over the SMs."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    want = triton.next_power_of_2(triton.cdiv(2 * sms, programs))
    return max(1, min(want, MAX_SPLITS, triton.cdiv(length, tile_rows)))


def select_kept(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    part_blocks: torch.Tensor,
    ref_blocks: torch.Tensor,
    keep: int,
    score_v_ratio: float = 1.0,
    *,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    scores_out: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    layer_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-``keep`` tokens of each partition per KV head, scored against its successor.

    Caches and block ids as in ``naive.py`` (any strides). Returns ``[R, num_kv_heads, keep]``
    int64, increasing. ``num_splits`` overrides how many token slices
    each (request, head) is scored in; ``out`` (contiguous int64) receives the result;
    ``scores_out`` (``[R, H, L]`` float32), when given, receives the scores the selection was
    made from (for tests). ``active`` (``[R]`` int32 on the device): only rows with a non-zero
    entry are scored, the others' output is left as it was; a captured CUDA graph launches over a
    fixed number of rows and the device decides which of them compress.

    ``layer_offsets`` (``[layers]`` int64 on the device): score every layer of a step in the same
    launches. Layer ``l``'s caches are the given ones shifted by ``layer_offsets[l]`` elements
    (same shape and strides: vLLM allocates every layer of a KV-cache group alike); the block ids
    are shared. The result, ``out`` and ``scores_out`` then have a leading ``[layers]`` dim.
    """
    num_blocks, num_heads, block_size, dim_k = key_cache.shape
    dim_v = value_cache.shape[-1]
    assert value_cache.shape[:3] == key_cache.shape[:3], "K and V caches must share blocks"
    requests, blocks_per_part = part_blocks.shape
    assert ref_blocks.shape == part_blocks.shape, "partition p and p+1 have the same length"
    length = blocks_per_part * block_size
    assert 0 < keep <= length, f"keep={keep} must be in 1..{length}"
    device = key_cache.device
    layers = 1 if layer_offsets is None else layer_offsets.shape[0]
    lead = () if layer_offsets is None else (layers,)
    if out is None:
        out = torch.empty(*lead, requests, num_heads, keep, dtype=torch.int64, device=device)
    assert out.shape == (*lead, requests, num_heads, keep), "out: [(layers,) R, kv heads, keep]"
    assert out.dtype == torch.int64 and out.is_contiguous()
    if requests == 0 or layers == 0:
        return out
    part_blocks = part_blocks.contiguous()
    ref_blocks = ref_blocks.contiguous()
    spread = torch.empty(layers, requests, num_heads, 2, length, dtype=torch.float32, device=device)

    tile_k, tile_v = tile_tokens(dim_k, length), tile_tokens(dim_v, length)
    programs = requests * num_heads * 2
    # With a mask the launch may sit in a captured graph, compiled before capture: one split,
    # so the kernels' arguments (and Triton's specialisation) do not depend on the row count.
    default = 1 if active is not None else None
    splits = num_splits or default or _default_splits(device, programs, length, min(tile_k, tile_v))
    split_tokens = triton.cdiv(length, splits)
    block_dk, block_dv = triton.next_power_of_2(dim_k), triton.next_power_of_2(dim_v)
    range_w = max(block_dk, block_dv)
    ranges = torch.empty(layers, requests * num_heads, 2, splits, 2, range_w, device=device)
    grid = (requests * num_heads, 2 * layers, splits)
    shapes = dict(
        L=length,
        DK=dim_k,
        DV=dim_v,
        BLOCK_SIZE=block_size,
        BLOCK_TK=tile_k,
        BLOCK_TV=tile_v,
        BLOCK_DK=block_dk,
        BLOCK_DV=block_dv,
        RANGE_W=range_w,
    )
    strides = (key_cache, *key_cache.stride(), value_cache, *value_cache.stride())
    has_active = active is not None
    active_arg = active if has_active else part_blocks  # never read without HAS_ACTIVE
    flags = dict(HAS_ACTIVE=has_active, LAYERED=layer_offsets is not None)
    layer_arg = layer_offsets if layer_offsets is not None else part_blocks  # read if LAYERED
    for ranges_pass, blocks in ((True, ref_blocks), (False, part_blocks)):
        _channels_kernel[grid](
            *strides, blocks, blocks.stride(0), ranges, spread, active_arg, layer_arg, num_heads,
            split_tokens, **shapes, **flags, RANGES=ranges_pass, num_warps=SPREAD_WARPS,
        )  # fmt: skip
    if scores_out is not None:
        assert scores_out.shape == (*lead, requests, num_heads, length)
        assert scores_out.dtype == torch.float32 and scores_out.is_contiguous()
    _top_keep_kernel[(requests * num_heads, layers)](
        spread,
        out,
        scores_out if scores_out is not None else spread,
        active_arg,
        num_heads,
        float(score_v_ratio),
        L=length,
        KEEP=keep,
        BLOCK_L=triton.next_power_of_2(length),
        WRITE_SCORES=scores_out is not None,
        HAS_ACTIVE=has_active,
        num_warps=8 if length >= 1024 else 4,
        # torch rounds ratio * s_V, then the sum: no fused multiply-add.
        enable_fp_fusion=False,
    )
    return out
