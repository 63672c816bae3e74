"""LRSA training attention as TWO dense calls merged by log-sum-exp ("split").

What it computes, in plain torch terms. Cut the sequence into blocks: the sink ``[0, S)`` is
one block, then each partition is one. A query t of block b sees (``docs/lagkv.md``)

    own(t)   = the keys of its own block up to t            (causal inside the block)
    older(b) = every visible key before the block:  sink ; kept(0..q-2) ; raw partition q-1

(``older`` is empty for the sink block; it is the sink for partition 0 and sink + partition 0 for
partition 1, i.e. plain causal attention there). The two key sets are disjoint, so

    attention(t) = softmax over own(t) ∪ older(b)
                 = merge((o_own, lse_own), (o_older, lse_older))
    merge:  lse = logaddexp(lse_a, lse_b),  o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b

Two kernel calls compute the parts for the whole layer at once:

- LOCAL: every block padded at its end to one width (``max(S, L)``), ``[B*blocks, H, width, D]``,
  square causal attention: one batched dense call (cuDNN SDPA on CUDA: the fastest dense kernel
  on the H100, see notes/training.md). Pads come after the real rows, so causality hides them.
- GLOBAL: one item per block with older keys: its queries over the gathered ``older`` list,
  NOT causal (all older keys precede the block): one varlen call (FlashAttention-2 on CUDA;
  ``LRSA_SPLIT_KERNELS=flash,flash`` puts the local part on FA2 too).

The backward is the standard split-softmax rule: each part's kernel backward is called with the
MERGED output and log-sum-exp (``dS = P (dP - rowsum(dO * O))`` with P from the merged lse is
each part's exact share of the full softmax gradient). ``math`` kernels write both parts and
that backward out in plain torch (any device/dtype): the CPU tests check them against the
float64 oracle. Which keys go where is derived from ``lagkv`` (``plan_for``), as
``lrsa_varlen.packing_for`` does; the kept rows come from ``lagkv.select_all``.

Measured (H100, torch 2.11, notes/training.md section 1): exact, but SLOWER than the single
varlen call (16.1 vs 13.9 ms fwd+bwd at 32K), so it is not the CUDA default. Nearly all visible
pairs are older keys (~155M of ~172M per head at 32K), so the FA2 global call alone (11.5 ms) is
most of the varlen time; the cuDNN local part is 1.25 ms and the merge/gathers ~2.7 ms. Putting
the global part on cuDNN too was tried: cuDNN's varlen backward gives wrong/NaN gradients in
torch 2.11 (its forward is right; likely the bug fixed by pytorch PR #186142, which sized the
backward's buffers by the head dim), and dense cuDNN calls over
padded groups with an extra head-dim column that silences padding keys were exact but 2x slower
than FA2 (commit 7094c56).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from lrsa_serve import lagkv
from lrsa_serve.kernels.lrsa_varlen import PartitionSizes, in_autocast_dtype, key_index

LOCAL_KERNELS = ("cudnn", "flash", "math")
GLOBAL_KERNELS = ("flash", "math")


@dataclass(frozen=True, eq=False)  # hashed by identity: ``plan_for`` caches instances
class SplitPlan:
    """Where each token's keys go, for one sequence of ``length`` tokens.

    ``token_rows[t]``: row of token t in the local layout (``blocks * width`` rows, block-major);
    global items: the blocks from ``global_from`` on, ``q_lens``/``k_lens`` per item and
    ``template`` (as ``lrsa_varlen.Packing``): per packed key row its source, ``< length`` a raw
    position, ``>= length`` the kept slot ``template - length`` of ``kept.flatten(-2)``.
    """

    length: int
    width: int
    blocks: int
    token_rows: torch.Tensor
    global_from: int
    q_lens: tuple[int, ...]
    k_lens: tuple[int, ...]
    template: tuple[int, ...]

    @property
    def has_global(self) -> bool:
        return self.global_from < self.length


@lru_cache(maxsize=64)
def plan_for(length: int, sink: int, lag: int, keep: int) -> SplitPlan:
    """Blocks from ``lagkv.partition_of`` (the sink, partition 0, 1, ...); a block's older keys
    are what its first query sees before the block (``raw_key_visible``, ``gathered_key_visible``);
    the tests check that own ∪ older is ``lagkv.visibility_mask`` for every query."""
    rule = PartitionSizes(sink, lag, keep)
    positions = torch.arange(length)
    part = lagkv.partition_of(positions, rule)
    block = torch.where(part < 0, 0, part + int(bool(sink)))  # the sink is block 0
    starts = [int(s) for s in torch.unique_consecutive(block, return_counts=True)[1].cumsum(0)]
    starts = [0, *starts[:-1]] if length else []
    sizes = torch.bincount(block, minlength=1)
    width = int(sizes.max()) if length else 1
    token_rows = block * width + positions - torch.tensor(starts, dtype=torch.long)[block]
    slots = torch.arange(lagkv.compressed_partitions(length, rule) * keep)
    q_lens, k_lens, template = [], [], []
    global_from = length
    for first, size in zip(starts, sizes.tolist(), strict=True):
        first_t = torch.tensor(first)
        raw = positions[lagkv.raw_key_visible(first_t, positions, rule) & (positions < first)]
        kept = (slots[lagkv.gathered_key_visible(first_t, slots, rule)] + length).tolist()
        raw = raw.tolist()
        keys = [p for p in raw if p < sink] + kept + [p for p in raw if p >= sink]
        if not keys:
            if global_from < length:
                raise AssertionError("a block without older keys after one with them")
            continue
        global_from = min(global_from, first)
        q_lens.append(size)
        k_lens.append(len(keys))
        template.extend(keys)
    return SplitPlan(
        length,
        width,
        len(starts),
        token_rows,
        global_from,
        tuple(q_lens),
        tuple(k_lens),
        tuple(template),
    )


@lru_cache(maxsize=64)
def _tensors(plan: SplitPlan, batch: int, device: str):
    """On the device: token rows ``[n]``, merge rows (local flat rows of the global queries,
    all sequences), cu_seq_q/k (int32) and the key template."""
    rows = plan.token_rows.to(device)
    per_seq = plan.blocks * plan.width
    offsets = torch.arange(batch, device=device)[:, None] * per_seq
    merge_rows = (offsets + rows[plan.global_from :]).flatten()
    zero = torch.zeros(1, dtype=torch.int64)
    q_lens = torch.tensor(plan.q_lens * batch, dtype=torch.int64)
    k_lens = torch.tensor(plan.k_lens * batch, dtype=torch.int64)
    cu_q = torch.cat([zero, q_lens.cumsum(0)]).to(torch.int32).to(device)
    cu_k = torch.cat([zero, k_lens.cumsum(0)]).to(torch.int32).to(device)
    template = torch.tensor(plan.template, dtype=torch.int64, device=device)
    return rows, merge_rows, cu_q, cu_k, template


# ---- the kernels: (out, lse, saved) forward, (dq, dk, dv) backward with the merged out/lse -----
# Local: q [N, Hq, W, D], k/v [N, Hkv, W, D], square causal; lse [N, Hq, W] (canonical view).
# Global: q [Tq, Hq, D], k/v [Tk, Hkv, D], items by cu_q/cu_k, not causal; lse [Hq, Tq].
def _scores(q, k, scale, causal):
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:  # square blocks: top-left and bottom-right alignment agree
        lq, lk = scores.shape[-2:]
        future = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores


def _attention_math(q, k, v, scale, causal):
    """q ``[..., H, lq, D]``, k/v ``[..., Hkv, lk, D]``: (out, lse ``[..., H, lq]``)."""
    groups = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(groups, -3), v.repeat_interleave(groups, -3)
    scores = _scores(q, k, scale, causal)
    lse = scores.logsumexp(-1)
    return (scores - lse[..., None]).exp() @ v, lse


def _attention_backward_math(grad, q, k, v, out, lse, scale, causal):
    """The kernels' backward contract: probabilities from the GIVEN lse, D = rowsum(dO * O) from
    the GIVEN out; K/V gradients summed over each GQA group."""
    groups = q.shape[-3] // k.shape[-3]
    kr, vr = k.repeat_interleave(groups, -3), v.repeat_interleave(groups, -3)
    scores = _scores(q, kr, scale, causal)
    probs = (scores - lse[..., None]).exp()
    dprobs = grad @ vr.transpose(-1, -2)
    dscores = probs * (dprobs - (grad * out).sum(-1, keepdim=True)) * scale
    dq = dscores @ kr
    dk = (dscores.transpose(-1, -2) @ q).unflatten(-3, (-1, groups)).sum(-3)
    dv = (probs.transpose(-1, -2) @ grad).unflatten(-3, (-1, groups)).sum(-3)
    return dq, dk, dv


def _dense_forward(kernel, q, k, v, scale, causal=True):
    if kernel == "cudnn":
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )
        return res[0], res[1], res[2:8]
    if kernel == "flash":
        res = torch.ops.aten._flash_attention_forward(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None,
            q.shape[2], k.shape[2], 0.0, causal, False, scale=scale,
        )  # fmt: skip
        return res[0].transpose(1, 2), res[1], res[2:4]
    if kernel == "math":
        out, lse = _attention_math(q, k, v, scale, causal)
        return out, lse, None
    raise ValueError(f"local kernel must be one of {LOCAL_KERNELS}, not {kernel!r}")


def _dense_backward(kernel, grad, q, k, v, out, lse, saved, scale, causal=True):
    if kernel == "cudnn":
        cum_q, cum_k, max_q, max_k, seed, offset = saved
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, causal,
            scale=scale,
        )  # fmt: skip
    if kernel == "flash":
        t = (x.transpose(1, 2) for x in (grad, q, k, v, out))
        grads = torch.ops.aten._flash_attention_backward(
            *t, lse, None, None, q.shape[2], k.shape[2], 0.0, causal, *saved, scale=scale
        )
        return tuple(g.transpose(1, 2) for g in grads)
    return _attention_backward_math(grad, q, k, v, out, lse, scale, causal)


def _items(cu: torch.Tensor):
    bounds = cu.tolist()
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _global_forward(kernel, q, k, v, cu_q, cu_k, max_q, max_k, scale):
    if kernel == "flash":
        res = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False, scale=scale
        )
        return res[0], res[1], res[2:4]
    if kernel != "math":
        raise ValueError(f"global kernel must be one of {GLOBAL_KERNELS}, not {kernel!r}")
    outs, lses = [], []
    for (q0, q1), (k0, k1) in zip(_items(cu_q), _items(cu_k), strict=True):
        t = [x.transpose(0, 1) for x in (q[q0:q1], k[k0:k1], v[k0:k1])]
        out, lse = _attention_math(*t, scale, causal=False)
        outs.append(out.transpose(0, 1))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=-1), None


def _global_backward(kernel, grad, q, k, v, out, lse, saved, cu_q, cu_k, max_q, max_k, scale):
    if kernel == "flash":
        return torch.ops.aten._flash_attention_backward(
            grad, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, False, *saved, scale=scale
        )
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for (q0, q1), (k0, k1) in zip(_items(cu_q), _items(cu_k), strict=True):
        t = [x.transpose(0, 1) for x in (grad[q0:q1], q[q0:q1], k[k0:k1], v[k0:k1])]
        o = out[q0:q1].transpose(0, 1)
        gq, gk, gv = _attention_backward_math(*t, o, lse[:, q0:q1], scale, causal=False)
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = gq.transpose(0, 1), gk.transpose(0, 1), gv.transpose(0, 1)
    return dq, dk, dv


def _lse_view(lse: torch.Tensor, heads: int, rows: int, local: bool) -> torch.Tensor:
    """A view of a kernel's lse in the canonical layout (local ``[N, H, W]``, global
    ``[H, T]``), so merged values written into it land where the kernel's backward reads them."""
    if local:
        return lse.squeeze(-1) if lse.dim() == 4 else lse
    if lse.shape != (heads, rows):
        raise RuntimeError(f"unexpected varlen lse shape {tuple(lse.shape)} for {heads}x{rows}")
    return lse


class _SplitAttention(torch.autograd.Function):
    """Local and global parts, merged by LSE; returns the LOCAL layout ``[N, Hq, W, D]`` with
    the merged rows written in (the backward hands both kernels the merged out/lse)."""

    @staticmethod
    def forward(ctx, q_loc, k_loc, v_loc, q_glob, k_glob, v_glob, call):
        kernels, scale, merge_rows, cu_q, cu_k, max_q, max_k = call
        heads = q_loc.shape[1]
        with torch.autocast(q_loc.device.type, enabled=False):
            out, lse_raw, saved_l = _dense_forward(kernels[0], q_loc, k_loc, v_loc, scale)
            out_g = lse_g_raw = saved_g = None
            if merge_rows is not None:
                out_g, lse_g_raw, saved_g = _global_forward(
                    kernels[1], q_glob, k_glob, v_glob, cu_q, cu_k, max_q, max_k, scale
                )
                if _rows(out).data_ptr() != out.data_ptr():  # make the merged rows writable
                    out = out.transpose(1, 2).contiguous().transpose(1, 2)
                lse_raw = lse_raw.clone()  # the merged lse is written into both kernels' lse
                lse = _lse_view(lse_raw, heads, 0, local=True)  # [N, H, W]
                lse_g = _lse_view(lse_g_raw, heads, q_glob.shape[0], local=False)  # [H, Tg]
                block, col = merge_rows // out.shape[2], merge_rows % out.shape[2]
                lse_a, lse_b = lse[block, :, col], lse_g.t()  # [Tg, H]
                merged_lse = torch.logaddexp(lse_a, lse_b)
                weight_a = (lse_a - merged_lse).exp()[..., None]
                weight_b = (lse_b - merged_lse).exp()[..., None]
                rows = _rows(out)
                wide = torch.promote_types(out.dtype, torch.float32)  # merge in >= float32
                o_a = rows.index_select(0, merge_rows).to(wide)
                out_g = (o_a * weight_a + out_g.to(wide) * weight_b).to(out.dtype)
                rows.index_copy_(0, merge_rows, out_g)
                lse[block, :, col] = merged_lse
                lse_g.copy_(merged_lse.t())
        ctx.kernels, ctx.scale, ctx.sizes = kernels, scale, (max_q, max_k)
        ctx.saved_l, ctx.saved_g = saved_l, saved_g
        ctx.has_global = merge_rows is not None
        ctx.save_for_backward(
            q_loc, k_loc, v_loc, out, lse_raw, q_glob, k_glob, v_glob, out_g, lse_g_raw,
            merge_rows, cu_q, cu_k,
        )  # fmt: skip
        return out

    @staticmethod
    def backward(ctx, grad):
        (q_loc, k_loc, v_loc, out, lse_raw, q_glob, k_glob, v_glob, out_g, lse_g, merge_rows,
         cu_q, cu_k) = ctx.saved_tensors  # fmt: skip
        kernels, scale = ctx.kernels, ctx.scale
        if grad.stride() != out.stride():  # the kernels read dO in out's layout
            grad = torch.empty_like(out).copy_(grad)
        with torch.autocast(q_loc.device.type, enabled=False):
            dq_l, dk_l, dv_l = _dense_backward(
                kernels[0], grad, q_loc, k_loc, v_loc, out, lse_raw, ctx.saved_l, scale
            )
            dq_g = dk_g = dv_g = None
            if ctx.has_global:
                grad_g = _rows(grad).index_select(0, merge_rows)
                dq_g, dk_g, dv_g = _global_backward(
                    kernels[1], grad_g, q_glob, k_glob, v_glob, out_g, lse_g, ctx.saved_g,
                    cu_q, cu_k, *ctx.sizes, scale,
                )  # fmt: skip
        return dq_l, dk_l, dv_l, dq_g, dk_g, dv_g, None


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Local layout ``[N, H, W, D]`` -> ``[N*W, H, D]`` (a view for the BSHD layout we build)."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def default_kernels(query: torch.Tensor) -> tuple[str, str]:
    """``LRSA_SPLIT_KERNELS`` ("local,global") if set; else cuDNN + FlashAttention-2 varlen on
    CUDA (fp16/bf16, head dim a multiple of 8 up to 128), math elsewhere."""
    forced = os.environ.get("LRSA_SPLIT_KERNELS")
    if forced:
        local, glob = forced.split(",")
        return local, glob
    if query.is_cuda:
        return "cudnn", "flash"
    return "math", "math"


def supported(query: torch.Tensor) -> bool:
    """Whether the CUDA kernels take this query as it will be attended (the autocast dtype
    under autocast); callers use the varlen path otherwise (e.g. float32)."""
    dtype = query.dtype
    if torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)
    d = query.shape[-1]
    return dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 128


def _blocks(x: torch.Tensor, plan: SplitPlan, rows: torch.Tensor) -> torch.Tensor:
    """``[B, n, H, D]`` -> local layout ``[B*blocks, H, width, D]`` (BSHD in memory)."""
    b, n, h, d = x.shape
    total = plan.blocks * plan.width
    if _identity_rows(plan):
        padded = x.reshape(b, total, h, d)
    else:
        padded = x.new_zeros(b, total, h, d).index_copy(1, rows, x)
    return padded.view(b * plan.blocks, plan.width, h, d).transpose(1, 2)


@lru_cache(maxsize=64)
def _identity_rows(plan: SplitPlan) -> bool:
    return plan.blocks * plan.width == plan.length and bool(
        (plan.token_rows == torch.arange(plan.length)).all()
    )


def lrsa_split_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rule,
    scaling: float | None = None,
    *,
    kernels: tuple[str, str] | None = None,
    kept: torch.Tensor | None = None,
) -> torch.Tensor:
    """LRSA attention of whole sequences: ``[B, n, Hq, D]`` (HF's layout).

    query ``[B, Hq, n, D]``, key/value ``[B, Hkv, n, D]`` (post-RoPE), Hq a multiple of Hkv.
    ``rule`` has sink/lag/keep/score_v_ratio; ``kept`` (``[B, Hkv, P, keep]``) defaults to
    ``lagkv.select_all`` of this key/value under no_grad; ``kernels`` = (local, global).
    """
    query, key, value = in_autocast_dtype(query, key, value)
    b, hq, n, d = query.shape
    hkv = key.shape[1]
    scale = d**-0.5 if scaling is None else scaling
    kernels = kernels or default_kernels(query)
    plan = plan_for(n, rule.sink, rule.lag, rule.keep)
    rows, merge_rows, cu_q, cu_k, template = _tensors(plan, b, str(query.device))
    q = query.transpose(1, 2)  # [B, n, H, D]
    k = key.to(query.dtype).transpose(1, 2)
    v = value.to(query.dtype).transpose(1, 2)
    q_loc, k_loc, v_loc = (_blocks(x, plan, rows) for x in (q, k, v))
    if plan.has_global:
        if kept is None:
            with torch.no_grad():
                kept = lagkv.select_all(key, value, rule)
        index = key_index(kept, plan, template)[..., None].expand(-1, -1, -1, d)
        k_glob = k.gather(1, index).reshape(-1, hkv, d)
        v_glob = v.gather(1, index).reshape(-1, hkv, d)
        q_glob = q[:, plan.global_from :].reshape(-1, hq, d)
        call = (kernels, scale, merge_rows, cu_q, cu_k, max(plan.q_lens), max(plan.k_lens))
    else:
        q_glob = k_glob = v_glob = None
        call = (kernels, scale, None, None, None, 0, 0)
    out = _SplitAttention.apply(q_loc, k_loc, v_loc, q_glob, k_glob, v_glob, call)
    out = _rows(out).view(b, plan.blocks * plan.width, hq, d)
    return out if _identity_rows(plan) else out.index_select(1, rows)


__all__ = [
    "GLOBAL_KERNELS",
    "LOCAL_KERNELS",
    "SplitPlan",
    "default_kernels",
    "lrsa_split_attention",
    "plan_for",
    "supported",
]
