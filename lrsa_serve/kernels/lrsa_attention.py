"""LRSA training attention: one varlen dense-attention call (CUDA default, ``lrsa_varlen``), or
gathered kept K/V + FlexAttention under a static, cached block mask.

Registered in transformers' ``AttentionInterface`` as ``"lrsa"`` (no model code copied); the
settings come from ``model.config.lagkv`` as for ``"lagkv_reference"``. The rule is docs/lagkv.md's
static formulation: per layer and KV head the kept rows of every compressed partition are
selected from the layer's own post-RoPE K/V under ``no_grad`` (``lagkv.select_all``) and appended
after the raw rows, ``K_ext = [K ; gather(K, kept)]``; one FlexAttention call then attends under
a mask that depends only on (length, S, L, keep): ``lagkv.raw_key_visible`` on the raw rows,
``lagkv.gathered_key_visible`` on the gathered ones. Gradients reach K/V through the gather.

Dispatch (explicit, never silent):

- CUDA (or ``backend="varlen"``): ``lrsa_varlen``: the same rule as ONE variable-length dense
  attention call (FlashAttention-4 or -2 varlen, bottom-right causal per partition item) over
  gathered key lists, with the selection below (compiled torch; from 32K tokens the serving
  engine's Triton kernel). Measured fastest on the H100 (notes/training.md). It runs as the
  custom op ``lrsa::varlen`` (``lrsa_op``), which a compiled decoder layer traces as one node;
  ``LRSA_VARLEN_OP=off`` and float32 queries on CUDA run it eagerly behind a graph break.
  On CPU ``backend="varlen"`` runs the items in plain torch (tests).
- ``backend="flex"``: the FlexAttention path below, compiled once per length bucket (or once
  with dynamic shapes, ``LRSA_FLEX_DYNAMIC=1``). The dynamo recompile limit is raised and hitting
  it is made an error, because past it dynamo runs flex_attention eagerly, i.e. as dense math
  that materialises n x n scores (OOM at 32K).
- CPU (or ``backend="dense"``): ``reference_attention``'s exact dense masked path. FlexAttention
  has no CPU backward, so training on CPU uses it; the tests compare the paths.
- Queries fewer than keys (decoding with a cache) always take the reference path: the static
  layout is defined for a whole sequence at once.

Layout of one sequence in the flex call (``Layout``): the length is rounded up ("bucketed") so
that ``bucket - S`` is a multiple of L, which bounds the number of distinct block masks and keeps
every partition whole; when L is a multiple of the sparse block size, ``front_pad`` rows are
inserted after the sink so partition boundaries fall on block boundaries (then nearly every
visited block is a full block and skips mask evaluation). Padded rows are invisible to real
queries: tail rows sit after every real position (causality hides them) and the gathered rows of
the one extra partition a bucket may add are visible only to queries of partition >= that + 2,
which are all past the real length.

Batches: sequences start at position 0; right padding is harmless (causal attention never lets a
real token see a later pad), so ``attention_mask`` is not consulted. Left padding is not supported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers import AttentionInterface, PreTrainedModel

from lrsa_serve import lagkv
from lrsa_serve.config import CONFIG_KEY, LagKVConfig, keep_for
from lrsa_serve.kernels import lrsa_op, selection_replay
from lrsa_serve.kernels.lrsa_varlen import (
    TRITON_MIN_LENGTH,
    env_choice,
    lrsa_varlen_attention,
)
from lrsa_serve.reference_attention import lagkv_reference_attention, settings_of

NAME = "lrsa"
# FlexAttention's sparse block (rows x columns of the block mask) on CUDA.
SPARSE_BLOCK = 128
# Distinct compiled graphs we allow: buckets are multiples of L, so even L=128 at 32K stays below.
RECOMPILE_LIMIT = 256
BACKENDS = ("auto", "varlen", "flex", "dense")


@dataclass(frozen=True)
class Rule:
    """The four LagKV numbers the mask and the selection read (``lagkv`` duck-types its ``cfg``).

    A frozen dataclass rather than the pydantic ``LagKVConfig``: torch.compile traces through it
    without graph breaks, and it is hashable for the mask cache.
    """

    sink: int
    lag: int
    keep: int
    score_v_ratio: float

    @classmethod
    def of(cls, cfg: LagKVConfig) -> Rule:
        return cls(cfg.sink, cfg.lag, cfg.keep, cfg.score_v_ratio)


@dataclass(frozen=True)
class Layout:
    """Rows of one sequence of ``length`` tokens in the flex call (see the module docstring)."""

    length: int
    bucket: int
    front_pad: int
    num_parts: int  # compressed partitions of the bucket: gathered groups of ``keep`` rows
    keep: int
    sink: int

    @classmethod
    def of(cls, length: int, rule: Rule, block: int) -> Layout:
        whole = -(-max(0, length - rule.sink) // rule.lag)  # partitions, last one rounded up
        bucket = rule.sink + whole * rule.lag
        align = block if rule.lag % block == 0 else 1
        front_pad = (-rule.sink) % align if bucket > rule.sink else 0
        num_parts = lagkv.compressed_partitions(bucket, rule)
        return cls(length, bucket, front_pad, num_parts, rule.keep, rule.sink)

    @property
    def raw_rows(self) -> int:
        return self.bucket + self.front_pad

    @property
    def kv_rows(self) -> int:
        return self.raw_rows + self.num_parts * self.keep


def make_mask_mod(rule: Rule, layout: Layout, device: torch.device | str) -> Callable:
    """The flex mask_mod in layout rows: the rule of docs/lagkv.md via ``lagkv``'s predicates.

    ``raw_rows`` is captured as a tensor (not a Python int) so that one compiled flex graph with
    dynamic shapes serves every bucket; S, pad, L and keep are fixed for a run.
    """
    sink, pad = rule.sink, layout.front_pad
    raw_rows = torch.tensor(layout.raw_rows, device=device)

    def position(row: torch.Tensor) -> torch.Tensor:
        return torch.where(row < sink, row, row - pad)

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos, k_pos = position(q_idx), position(kv_idx)
        q_pad = (q_idx >= sink) & (q_idx < sink + pad)
        k_pad = (kv_idx >= sink) & (kv_idx < sink + pad)
        is_raw = kv_idx < raw_rows
        raw = is_raw & ~k_pad & lagkv.raw_key_visible(q_pos, k_pos, rule)
        gathered = ~is_raw & lagkv.gathered_key_visible(q_pos, kv_idx - raw_rows, rule)
        # A front-pad query sees only itself (a zero row), so no row is empty: no NaN anywhere
        # and flex may assume ROWS_GUARANTEED_SAFE.
        return torch.where(q_pad, kv_idx == q_idx, raw | gathered)

    return mask_mod


@lru_cache(maxsize=128)
def block_mask_for(rule: Rule, layout: Layout, device: str, block: int):
    """The static block mask of one (bucket, S, L, keep): built once, reused by every layer and
    step. Batch and head are broadcast (None): the mask is the same for all of them."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(
        make_mask_mod(rule, layout, device),
        None,
        None,
        layout.raw_rows,
        layout.kv_rows,
        device=device,
        BLOCK_SIZE=block,
        _compile=torch.device(device).type == "cuda",
    )


def select_kept(key: torch.Tensor, value: torch.Tensor, rule: Rule) -> torch.Tensor:
    """Kept absolute positions ``[B, Hkv, P, keep]`` (``lagkv.select_all``), without gradient.
    In a checkpointed layer's recompute, the positions its forward selected
    (``selection_replay``)."""

    def select() -> torch.Tensor:
        with torch.no_grad():
            return _selector(selector_for(key))(key, value, rule)

    return selection_replay.remembered(select, key, rule)


SELECTORS = ("auto", "triton", "compiled", "eager")


def selector_for(key: torch.Tensor) -> str:
    """``LRSA_SELECT`` if set; else on CUDA the serving engine's Triton kernel
    (``sequence_select``: three launches per layer) from ``TRITON_MIN_LENGTH`` tokens and
    ``compiled`` (``lagkv.select_all`` under ``torch.compile``) below; plain torch on CPU."""
    forced = env_choice("LRSA_SELECT", SELECTORS)
    if forced != "auto":
        return forced
    if not key.is_cuda:
        return "eager"
    return "triton" if key.shape[2] >= TRITON_MIN_LENGTH else "compiled"


@lru_cache(maxsize=4)
def _selector(name: str) -> Callable:
    if name == "triton":
        from lrsa_serve.kernels import sequence_select

        return sequence_select.select_all
    if name == "compiled":
        _raise_recompile_limit()
        return torch.compile(lagkv.select_all, dynamic=True)
    return lagkv.select_all


def extend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rule: Rule, layout: Layout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries and extended keys/values in layout rows: one concatenation each.

    query ``[B, Hq, n, D]``, key/value ``[B, Hkv, n, D]`` -> ``[B, Hq, raw_rows, D]`` and
    ``[B, Hkv, kv_rows, D]`` (raw rows with pads, then the gathered kept rows, partitions in order).
    """
    n, sink = layout.length, rule.sink
    kept = select_kept(key, value, rule)  # [B, Hkv, P(n), keep], P(n) <= layout.num_parts
    missing_parts = layout.num_parts - kept.shape[-2]

    def rows(x: torch.Tensor, gather: bool) -> torch.Tensor:
        pieces = [x[:, :, :sink]]
        if layout.front_pad:
            pieces.append(x.new_zeros(*x.shape[:2], layout.front_pad, x.shape[-1]))
        pieces.append(x[:, :, sink:])
        if layout.bucket > n:
            pieces.append(x.new_zeros(*x.shape[:2], layout.bucket - n, x.shape[-1]))
        if gather:
            flat = kept.flatten(-2)
            pieces.append(x.gather(2, flat[..., None].expand(*flat.shape, x.shape[-1])))
            if missing_parts:
                pieces.append(x.new_zeros(*x.shape[:2], missing_parts * rule.keep, x.shape[-1]))
        return torch.cat(pieces, dim=2) if len(pieces) > 2 or layout.front_pad else x

    return rows(query, gather=False), rows(key, gather=True), rows(value, gather=True)


def unextend(out: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Flex output ``[B, Hq, raw_rows, D]`` -> ``[B, n, Hq, D]`` (HF's layout), real rows only."""
    out = out.transpose(1, 2)
    n, sink, pad = layout.length, layout.sink, layout.front_pad
    if pad == 0:
        return out[:, :n]
    if n <= sink:
        return out[:, :n]
    return torch.cat([out[:, :sink], out[:, sink + pad : pad + n]], dim=1)


# ---- FlexAttention ------------------------------------------------------------------------------
def kernel_options() -> dict | None:
    """FlexAttention kernel options from ``LRSA_FLEX_KERNEL_OPTIONS`` (JSON), e.g. what
    ``benchmarks/train_attention.py`` found fastest; None keeps inductor's defaults."""
    raw = os.environ.get("LRSA_FLEX_KERNEL_OPTIONS")
    return json.loads(raw) if raw else None


def _raise_recompile_limit() -> None:
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    # Past the limit dynamo would run flex_attention eagerly = dense math: fail loudly instead.
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True


def flex_dynamic() -> bool:
    """Whether flex is compiled once with dynamic shapes (``LRSA_FLEX_DYNAMIC=1``) instead of
    once per bucket. Static is the default: measured on an H100 at 32K (notes/training.md) the
    static kernel ran fwd+bwd in 21.0 ms where the dynamic-shape one took ~28 ms, and a static
    compile took ~7 s per bucket; buckets are multiples of L, so a run compiles a handful."""
    return os.environ.get("LRSA_FLEX_DYNAMIC", "0") == "1"


@lru_cache(maxsize=4)
def compiled_flex(compile: bool = True, dynamic: bool | None = None) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    if not compile:  # eager flex: the math path, for small CPU tests only
        return flex_attention
    _raise_recompile_limit()
    return torch.compile(flex_attention, dynamic=flex_dynamic() if dynamic is None else dynamic)


def lrsa_flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cfg: LagKVConfig | Rule,
    scaling: float | None = None,
    *,
    block: int | None = None,
    compile: bool = True,
    dynamic: bool | None = None,
) -> torch.Tensor:
    """LRSA attention of whole sequences through FlexAttention: ``[B, n, Hq, D]``.

    query ``[B, Hq, n, D]``, key/value ``[B, Hkv, n, D]`` (post-RoPE), Hq a multiple of Hkv.
    ``block`` is the sparse block size (128 on CUDA; tests use small ones on CPU); ``compile``
    False runs flex eagerly (its math path: small CPU tests only); ``dynamic`` overrides
    ``flex_dynamic()``.
    """
    rule = cfg if isinstance(cfg, Rule) else Rule.of(cfg)
    block = block or SPARSE_BLOCK
    layout = Layout.of(query.shape[2], rule, block)
    q, k, v = extend(query, key, value, rule, layout)
    mask = block_mask_for(rule, layout, str(query.device), block)
    options = kernel_options()
    out = compiled_flex(compile, dynamic)(
        q,
        k,
        v,
        block_mask=mask,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
        **({"kernel_options": options} if options else {}),
    )
    return unextend(out, layout)


# ---- the dense formulation of the same layout (tests, and gradients on CPU) ---------------------
def lrsa_static_dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cfg: LagKVConfig | Rule,
    scaling: float | None = None,
    *,
    block: int = 16,
) -> torch.Tensor:
    """The flex path's exact math with the mask materialised from the same mask_mod: checks the
    gather, the layout and the mask_mod (and their gradients) where flex has no backward (CPU).
    Small sizes only: it builds the full ``raw_rows x kv_rows`` score matrix."""
    rule = cfg if isinstance(cfg, Rule) else Rule.of(cfg)
    layout = Layout.of(query.shape[2], rule, block)
    q, k, v = extend(query, key, value, rule, layout)
    rows = torch.arange(layout.raw_rows, device=query.device)[:, None]
    cols = torch.arange(layout.kv_rows, device=query.device)[None, :]
    visible = make_mask_mod(rule, layout, query.device)(None, None, rows, cols)
    groups = q.shape[1] // k.shape[1]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return unextend(torch.einsum("bhqk,bhkd->bhqd", probs, v), layout)


# ---- the varlen formulation (default on CUDA) ----------------------------------------------------
def lrsa_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cfg: LagKVConfig | Rule,
    scaling: float | None = None,
    *,
    kernel: str | None = None,
) -> torch.Tensor:
    """LRSA attention of whole sequences as one varlen attention call (``lrsa_varlen``), with
    this module's selection (compiled on CUDA): ``[B, n, Hq, D]``."""
    rule = cfg if isinstance(cfg, Rule) else Rule.of(cfg)
    kept = select_kept(key, value, rule)
    return lrsa_varlen_attention(query, key, value, rule, scaling, kernel=kernel, kept=kept)


# ---- the transformers attention function --------------------------------------------------------
_backend = os.environ.get("LRSA_ATTENTION_BACKEND", "auto")
_compile_flex = True


def set_backend(backend: str, *, compile_flex: bool = True) -> None:
    """``auto`` (varlen on CUDA, dense masked on CPU), ``varlen``, ``flex`` or ``dense``, for
    every model.
    ``compile_flex=False`` runs flex eagerly (its math path): small CPU tests only."""
    global _backend, _compile_flex
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    _backend, _compile_flex = backend, compile_flex


def backend_for(query: torch.Tensor) -> str:
    if _backend != "auto":
        return _backend
    return "varlen" if query.is_cuda else "dense"


# ``lrsa::varlen`` (lrsa_op) where it applies; ``LRSA_VARLEN_OP=off`` (or set_varlen_op(False))
# runs the same attention eagerly behind a graph break, as before the op.
_varlen_op = env_choice("LRSA_VARLEN_OP", ("auto", "off")) == "auto"


def set_varlen_op(enabled: bool) -> None:
    global _varlen_op
    _varlen_op = enabled


def _traceable_rule(module: torch.nn.Module) -> Rule | None:
    """The module's LagKV numbers read the way dynamo traces (the dict ``use_lrsa`` stores), or
    None (then the eager path reads them)."""
    section = getattr(module.config, CONFIG_KEY, None)
    if not isinstance(section, dict):
        return None
    lag, ratio = section["lag"], section["ratio"]
    return Rule(section["sink"], lag, keep_for(lag, ratio), section.get("score_v_ratio", 1.0))


def lrsa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The registered attention. The varlen backend runs as the custom op ``lrsa::varlen``, which
    a compiled decoder layer traces as one node; every other path runs eagerly, behind a graph
    break (``_eager_attention``)."""
    if _varlen_op and not (dropout and module.training) and backend_for(query) == "varlen":
        rule = _traceable_rule(module)
        if rule is not None and query.shape[2] == key.shape[2] and lrsa_op.op_applies(query):
            return lrsa_op.lrsa_varlen_op(query, key, value, rule, scaling), None
    return _eager_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


@torch.compiler.disable  # dynamo cannot trace these paths: a compiled layer breaks its graph here
def _eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if dropout and module.training:
        raise ValueError("LRSA attention does not implement attention dropout")
    backend = backend_for(query)
    if backend == "dense" or query.shape[2] != key.shape[2]:
        return lagkv_reference_attention(module, query, key, value, None, scaling=scaling)
    if backend == "varlen":
        return lrsa_varlen(query, key, value, settings_of(module), scaling), None
    out = lrsa_flex_attention(
        query, key, value, settings_of(module), scaling, compile=_compile_flex
    )
    return out, None


AttentionInterface.register(NAME, lrsa_attention)


def use_lrsa(model: PreTrainedModel, cfg: LagKVConfig) -> PreTrainedModel:
    """Switch a loaded HF model to LRSA attention with these settings."""
    model.config.lagkv = cfg.model_dump()
    model.set_attn_implementation(NAME)
    return model


@torch.no_grad()
def lrsa_forward_logits(
    model: PreTrainedModel, input_ids: torch.Tensor, cfg: LagKVConfig | None = None
) -> torch.Tensor:
    """Logits of a full forward pass under the LRSA mask (what training optimises), for comparing
    with the serving engine's prefill. ``cfg`` defaults to the checkpoint's ``config.lagkv``.
    The model's attention implementation and settings are restored afterwards."""
    if cfg is None:
        section = getattr(model.config, "lagkv", None)
        if section is None:
            raise ValueError("no LagKV settings: pass cfg or use a checkpoint with config.lagkv")
        cfg = section if isinstance(section, LagKVConfig) else LagKVConfig.build(**section)
    previous_impl = model.config._attn_implementation
    previous_cfg = getattr(model.config, "lagkv", None)
    use_lrsa(model, cfg)
    try:
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        return model(input_ids=input_ids.to(model.device), use_cache=False).logits
    finally:
        model.set_attn_implementation(previous_impl)
        if previous_cfg is None:
            del model.config.lagkv
        else:
            model.config.lagkv = previous_cfg


__all__ = [
    "NAME",
    "Layout",
    "Rule",
    "block_mask_for",
    "extend",
    "lrsa_attention",
    "lrsa_flex_attention",
    "lrsa_forward_logits",
    "lrsa_static_dense_attention",
    "lrsa_varlen",
    "set_backend",
    "set_varlen_op",
    "use_lrsa",
]
