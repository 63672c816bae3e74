"""LRSA training attention as ONE variable-length (varlen) dense attention call.

The sequence is cut into "items" (docs/lagkv.md, "How the trainer computes it"): the first
``S + 2L`` queries over the same keys, causal, then the queries of each partition q >= 2 over
``[sink ; kept(0..q-2) ; raw partition q-1 ; raw partition q up to t]``. The query block is the
END of its key list, so inside an item the rule is causal attention aligned bottom-right (query i
of lq sees keys ``<= lk - lq + i``): one varlen causal launch over all items, no mask, only the
visible pairs computed. Each item's keys are gathered from the layer's K/V (``pack_items``), the
way gradients reach them.

Kernels (``varlen_attention``; where each applies: ``kernel_applies``; ``auto``'s choice:
``default_kernel``): ``fa4`` (FlashAttention-4, the optional ``flash-attn-4`` package), ``flash``
(aten's FlashAttention-2), ``efficient`` (aten's memory-efficient kernel, K/V heads repeated for
GQA), ``math`` (each item through ``reference_attention.masked_attention``: the CPU tests' path
and the kernels' oracle).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import TYPE_CHECKING

import torch

from lrsa_serve import lagkv
from lrsa_serve.lagkv import Rule
from lrsa_serve.reference_attention import masked_attention
from lrsa_serve.training.attention import sequence_select
from lrsa_serve.training.attention.sequence_select import select_kept
from lrsa_serve.training.config import LRSA_KERNELS as KERNELS

if TYPE_CHECKING:
    from lrsa_serve.training.attention.pack_rows import Refs

# aten's CustomMaskType for the memory-efficient kernel: causal aligned to the bottom right.
_CAUSAL_FROM_BOTTOM_RIGHT = 2


@dataclass(frozen=True, eq=False)  # hashed by identity: ``packing_for`` caches instances
class Packing:
    """The items of one sequence of ``length`` tokens (see the module docstring).

    ``q_lens``/``k_lens``: per item; ``template``: for each key row of the packed key list (items
    in order) its source: ``< length`` a raw position, ``>= length`` the kept slot
    ``template - length`` of ``kept.flatten(-2)`` (partition-major).
    """

    length: int
    q_lens: tuple[int, ...]
    k_lens: tuple[int, ...]
    template: tuple[int, ...]

    def visible_pairs(self) -> int:
        """Query-key pairs the items compute (bottom-right causal): the rule's count exactly."""
        return sum(
            lq * (lk - lq) + lq * (lq + 1) // 2
            for lq, lk in zip(self.q_lens, self.k_lens, strict=True)
        )


@lru_cache(maxsize=64)
def packing_for(length: int, rule: Rule) -> Packing:
    """Items from ``lagkv``'s own rule: an item is a run of queries that see the same
    compressed history (``chunk_end_limit``, as the engine's prefill chunks); its keys are what
    its last query sees: the kept slots (``gathered_key_visible``), placed after the sink, then
    the raw keys (``raw_key_visible``), which end with the item's own queries."""
    positions = torch.arange(length)
    slots = torch.arange(lagkv.compressed_partitions(length, rule) * rule.keep)
    q_lens, k_lens, template = [], [], []
    start = 0
    while start < length:
        stop = min(length, lagkv.chunk_end_limit(start, rule))
        last = torch.tensor(stop - 1)
        raw = positions[lagkv.raw_key_visible(last, positions, rule)].tolist()
        kept = (slots[lagkv.gathered_key_visible(last, slots, rule)] + length).tolist()
        keys = [p for p in raw if p < rule.sink] + kept + [p for p in raw if p >= rule.sink]
        q_lens.append(stop - start)
        k_lens.append(len(keys))
        template.extend(keys)
        start = stop
    return Packing(length, tuple(q_lens), tuple(k_lens), tuple(template))


@lru_cache(maxsize=64)
def _tensors(packing: Packing, batch: int, device: str):
    """cu_seq_q/k (int32 prefix sums over the batch's sequences) and the template, on the device."""
    bounds = ([0, *accumulate(lens * batch)] for lens in (packing.q_lens, packing.k_lens))
    cu_q, cu_k = (torch.tensor(b, dtype=torch.int32, device=device) for b in bounds)
    template = torch.tensor(packing.template, dtype=torch.int64, device=device)
    return cu_q, cu_k, template


def key_index(kept: torch.Tensor, packing: Packing, template: torch.Tensor) -> torch.Tensor:
    """Raw positions of the packed key rows per KV head: ``[B, key_rows, Hkv]`` int64.

    kept: ``[B, Hkv, P, keep]`` absolute positions (``lagkv.select_all``)."""
    b, h = kept.shape[:2]
    raw = torch.arange(packing.length, device=kept.device).expand(b, h, -1)
    source = torch.cat([raw, kept.flatten(-2)], dim=-1)  # [B, Hkv, n + P*keep]
    return source[..., template].transpose(1, 2)


@dataclass(frozen=True, eq=False)
class Items:
    """The items of one call: their ``packing``, their bounds over the batch on the device
    (``cu_q``/``cu_k``, int32 prefix sums), the longest item's queries and keys, the selection
    ``kept`` ``[B, Hkv, P, keep]`` and the raw position of every packed key row, ``index``
    ``[B, key_rows, Hkv]`` (``key_index``)."""

    packing: Packing
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    kept: torch.Tensor
    index: torch.Tensor


def items_of(query: torch.Tensor, kept: torch.Tensor, rule: Rule) -> Items:
    """The items of queries ``[B, Hq, n, D]`` under the selection ``kept``. Their layout does
    not depend on the scores: one cached packing per length and rule."""
    b, _, n, _ = query.shape
    packing = packing_for(n, rule)
    cu_q, cu_k, template = _tensors(packing, b, str(query.device))
    index = key_index(kept, packing, template)
    return Items(packing, cu_q, cu_k, max(packing.q_lens), max(packing.k_lens), kept, index)


def query_rows(query: torch.Tensor) -> torch.Tensor:
    """The items' query rows ``[B * n, Hq, D]`` of queries ``[B, Hq, n, D]``."""
    b, hq, n, d = query.shape
    return query.transpose(1, 2).reshape(b * n, hq, d)


def fa4_items(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, items: Items, scale: float, **options
) -> tuple[torch.Tensor, ...]:
    """FlashAttention-4's varlen call over the items, bottom-right causal; ``options`` go to it
    as they are (``return_lse``). Returns its (output, log-sum-exp)."""
    return _fa4().flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=items.cu_q, cu_seqlens_k=items.cu_k, max_seqlen_q=items.max_q,
        max_seqlen_k=items.max_k, softmax_scale=scale, causal=True, **options,
    )  # fmt: skip


def flash_items(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, items: Items, scale: float
) -> tuple[torch.Tensor, ...]:
    """FlashAttention-2's varlen forward (aten's) over the items, bottom-right causal, no dropout:
    its output, log-sum-exp and the rest of aten's tuple."""
    return torch.ops.aten._flash_attention_forward(
        q, k, v, items.cu_q, items.cu_k, items.max_q, items.max_k, 0.0, True, False, scale=scale
    )


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, items: Items, scale: float, kernel: str
) -> torch.Tensor:
    """Bottom-right causal attention of each item with ``kernel`` (one of ``KERNELS`` but
    ``auto``, as ``default_kernel`` answers): q ``[Tq, Hq, D]``, k/v ``[Tk, Hkv, D]``. Returns
    ``[Tq, Hq, D]``."""
    if kernel == "fa4":
        return fa4_items(q, k, v, items, scale)[0]
    if kernel == "flash":
        return flash_items(q, k, v, items, scale)[0]
    if kernel == "math":
        return math_items(q, k, v, items, scale)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    out = torch.ops.aten._efficient_attention_forward(
        q[None], k[None], v[None], None, items.cu_q, items.cu_k, items.max_q, items.max_k, 0.0,
        _CAUSAL_FROM_BOTTOM_RIGHT, needs_grad, scale=scale,
    )[0]  # fmt: skip
    return out[0]


def math_items(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, items: Items, scale: float
) -> torch.Tensor:
    """The ``math`` kernel: each item through the reference attention, query i of lq seeing keys
    ``<= lk - lq + i`` (bottom-right causal). Shapes as ``varlen_attention``'s."""
    outs = []
    cq, ck = items.cu_q.tolist(), items.cu_k.tolist()
    for q0, q1, k0, k1 in zip(cq[:-1], cq[1:], ck[:-1], ck[1:], strict=True):
        lq, lk = q1 - q0, k1 - k0
        visible = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        qkv = (x.transpose(0, 1)[None] for x in (q[q0:q1], k[k0:k1], v[k0:k1]))
        outs.append(masked_attention(*qkv, visible.expand(1, k.shape[1], lq, lk), scale)[0])
    return torch.cat(outs, dim=0)


def attention_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype LRSA attends ``query`` in: as SDPA under autocast, the autocast dtype where
    autocast is on (RoPE makes fp32 q/k in a model whose weights are fp32, which would otherwise
    take the float32 kernel); else the query's own."""
    device = query.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype


def in_attention_dtype(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value in ``attention_dtype(query)``: one dtype for the kernels."""
    dtype = attention_dtype(query)
    return query.to(dtype), key.to(dtype), value.to(dtype)


@lru_cache(maxsize=1)
def _fa4():
    """``flash_attn.cute`` (FlashAttention-4), or None where it is not installed.

    Installed but failing to import (a missing shared library, a version mismatch) is an error:
    answering None there would quietly run FlashAttention-2 where FA4 was asked for."""
    try:
        return importlib.import_module("flash_attn.cute")
    except Exception as err:
        # Only the package itself missing means "not installed" (FlashAttention-2 alone is
        # ``flash_attn`` without ``cute``); any other missing module is a broken install.
        if isinstance(err, ModuleNotFoundError) and err.name in ("flash_attn", "flash_attn.cute"):
            return None
        raise ImportError(
            "flash-attn-4 (flash_attn.cute) is installed but does not import: "
            f"{type(err).__name__}: {err}; repair or uninstall the package"
        ) from err


def kernel_applies(kernel: str, query: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether ``kernel`` takes queries like ``query`` (``[..., D]``) attended in ``dtype`` (their
    own by default). The one place each kernel's conditions are written:

    - ``math``: any device and dtype; ``efficient``: CUDA, any floating dtype;
    - ``flash`` (FlashAttention-2): CUDA, fp16/bf16, head dim a multiple of 8 up to 256;
    - ``fa4``: flash's conditions with head dim up to 128, on Hopper or Blackwell (compute
      capability 9 or 10), where flash-attn-4 is installed.

    Up to ``flash`` it reads plain tensor attributes, so dynamo traces it (``op.op_applies``)."""
    if kernel not in KERNELS[1:]:
        raise ValueError(f"kernel must be one of {KERNELS[1:]}, not {kernel!r}")
    if kernel == "math":
        return True
    if query.device.type != "cuda":
        return False
    if kernel == "efficient":
        return True
    d = query.shape[-1]
    flash = (dtype or query.dtype) in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256
    if kernel == "flash" or not flash:
        return flash
    return (
        d <= 128
        and _fa4() is not None
        and torch.cuda.get_device_capability(query.device)[0] in (9, 10)
    )


# Below this many tokens FA2's lower per-call cost wins. H100, whole 0.5B model, both kernels'
# calls replayed from CUDA graphs: 8K steps 0.96x of dense on FA2 vs 0.85x on FA4, 16K 1.06x vs
# 1.27x (a tiny model at <1K tokens trained 1.45x faster on FA2). docs/training.md.
FA4_MIN_LENGTH = 16384


def check_kernel(kernel: str) -> str:
    """``kernel`` if it is one of ``KERNELS``; a kernel that cannot be taken is an error, never a
    silent fallback."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}")
    if kernel == "fa4" and _fa4() is None:
        raise ValueError("kernel 'fa4' needs the flash-attn-4 package (flash_attn.cute)")
    return kernel


def default_kernel(query: torch.Tensor, kernel: str = "auto") -> str:
    """``kernel`` if it names one; for ``auto``: fa4 where it is installed and applies from
    ``FA4_MIN_LENGTH`` tokens, flash where it applies, efficient for other CUDA dtypes / head
    dims, math on CPU. ``query`` is ``[B, Hq, n, D]``."""
    if check_kernel(kernel) != "auto":
        return kernel
    if not query.is_cuda:
        return "math"
    if query.shape[2] >= FA4_MIN_LENGTH and kernel_applies("fa4", query):
        return "fa4"
    return "flash" if kernel_applies("flash", query) else "efficient"


def packer_for(key: torch.Tensor) -> str:
    """How the items' key/value rows are gathered: ``triton`` on CUDA from ``TRITON_MIN_LENGTH``
    tokens (``pack_rows``: one launch, exact float32 gradient sums, deterministic) and ``torch``
    otherwise (``gather``, whose backward adds the rows up with atomics in the tensor's dtype).
    ``key`` is ``[B, Hkv, n, D]``."""
    # read at call time, as selector_for reads it: benchmarks/train_model.py --triton-all-lengths
    return (
        "triton" if key.is_cuda and key.shape[2] >= sequence_select.TRITON_MIN_LENGTH else "torch"
    )


def rows_refs(packing: Packing, kept: torch.Tensor) -> Refs:
    """``pack_rows``' inverted template of ``packing`` for the kept slots of ``kept``."""
    return _rows_refs(packing, kept.shape[-2] * kept.shape[-1], str(kept.device))


@lru_cache(maxsize=64)
def _rows_refs(packing: Packing, slots: int, device: str) -> Refs:
    # Cached per packing object: hashing its template per call would cost a millisecond of CPU
    # at 32K. pack_rows is imported here only: it needs Triton.
    from lrsa_serve.training.attention.pack_rows import refs_for

    return refs_for(packing.template, packing.length + slots, device)


def pack_items(
    key: torch.Tensor, value: torch.Tensor, items: Items
) -> tuple[torch.Tensor, torch.Tensor]:
    """The items' key and value rows ``[B * Tk, Hkv, D]`` of key/value ``[B, Hkv, n, D]``, from
    the raw positions ``items.index``. ``packer_for`` picks ``pack_rows`` or ``gather``;
    differentiable in key and value."""
    hkv, d = key.shape[1], key.shape[-1]
    if packer_for(key) == "triton":
        from lrsa_serve.training.attention.pack_rows import pack_rows

        refs = rows_refs(items.packing, items.kept)
        return pack_rows(key, value, items.index, items.kept, refs)
    index = items.index[..., None].expand(-1, -1, -1, d)
    k = key.transpose(1, 2).gather(1, index).reshape(-1, hkv, d)
    v = value.transpose(1, 2).gather(1, index).reshape(-1, hkv, d)
    return k, v


def pack_items_backward(
    grad_k: torch.Tensor, grad_v: torch.Tensor, key: torch.Tensor, value: torch.Tensor, items: Items
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pack_items``' backward without autograd: key/value gradients ``[B, Hkv, n, D]`` from
    the rows' ``[B * Tk, Hkv, D]``, summed as the chosen packer's own backward sums them."""
    if packer_for(key) == "triton":
        from lrsa_serve.training.attention.pack_rows import pack_rows_backward

        refs = rows_refs(items.packing, items.kept)
        return pack_rows_backward(grad_k, grad_v, key, value, items.kept, refs)
    b, hkv, n, d = key.shape
    index = items.index[..., None].expand(-1, -1, -1, d)

    def scatter(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(b, n, hkv, d, dtype=like.dtype, device=like.device)
        rows = grad.reshape(b, -1, hkv, d).to(like.dtype)
        return out.scatter_add_(1, index, rows).transpose(1, 2)

    return scatter(grad_k, key), scatter(grad_v, value)


def lrsa_varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rule: Rule,
    scaling: float | None = None,
    *,
    kernel: str = "auto",
    kept: torch.Tensor | None = None,
) -> torch.Tensor:
    """LRSA attention of whole sequences: ``[B, n, Hq, D]`` (HF's layout).

    query ``[B, Hq, n, D]``, key/value ``[B, Hkv, n, D]`` (post-RoPE), Hq a multiple of Hkv.
    ``kernel`` is one of ``KERNELS``; ``kept`` (``[B, Hkv, P, keep]``) defaults to the
    training selection of this key/value (``sequence_select.select_kept``: no gradient, replayed
    under checkpointing).
    """
    if kept is None:
        kept = select_kept(key, value, rule)
    query, key, value = in_attention_dtype(query, key, value)
    b, hq, n, d = query.shape
    scale = d**-0.5 if scaling is None else scaling
    kernel = default_kernel(query, kernel)
    items = items_of(query, kept, rule)
    k, v = pack_items(key, value, items)
    return varlen_attention(query_rows(query), k, v, items, scale, kernel).view(b, n, hq, d)
