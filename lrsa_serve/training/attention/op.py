"""LRSA attention (the varlen formulation, ``varlen``) as one custom op, ``lrsa::varlen``.

Why an op: dynamo cannot trace the LRSA attention (Python packing tables, the selection's own
compile, FlashAttention-4's CuTe launch); behind ``torch.compiler.disable`` it broke every
compiled decoder layer into several frames (its cost: docs/training.md). As a custom op it is one
opaque node of the layer's graph, forward and backward.

Forward: the selection (in a checkpoint recompute, the forward's: ``replay``), the items' key/value
rows (``varlen.pack_items``), the items' kernel; returns the output, the kernel's log-sum-exp and
the kept positions. Backward (``lrsa::varlen_backward``): the rows are packed again from the kept
positions (instead of held from forward to backward), the kernel's own backward runs on the
items, and the packer's backward adds the rows' gradients onto the raw keys and values. Kernels:
``OP_KERNELS``; queries none of them takes (float32 on CUDA) stay on the eager path. On CUDA
with FlashAttention (2 or 4) each of the three steps (selection, attention, backward) is captured
once per call shape as a CUDA graph and replayed for every layer (``graphs``, ``GRAPH_KERNELS``):
their launches cost the host more than their kernels cost the GPU at 8K tokens.
"""

from __future__ import annotations

import contextlib
import functools
import importlib

import torch
from torch.autograd import profiler

from lrsa_serve import lagkv
from lrsa_serve.lagkv import Rule
from lrsa_serve.training.attention import graphs, replay
from lrsa_serve.training.attention import varlen as lv
from lrsa_serve.training.attention.sequence_select import selector, selector_for

OP_KERNELS = ("fa4", "flash", "math")


def op_applies(query: torch.Tensor) -> bool:
    """Whether ``lrsa::varlen`` takes these queries, attended in ``lv.attention_dtype``: on CUDA
    where FlashAttention does (FA4 takes a subset), anywhere else with the math kernel. Plain
    tensor attributes only, so dynamo traces the choice."""
    if query.device.type != "cuda":
        return True
    return lv.kernel_applies("flash", query, lv.attention_dtype(query))


def _kernel(query: torch.Tensor, choice: str) -> str:
    """The items' kernel for ``choice`` (one of ``varlen.KERNELS``), which must be one the op
    runs."""
    kernel = lv.default_kernel(query, choice)
    if kernel in OP_KERNELS:
        return kernel
    if choice != "auto":
        raise ValueError(
            f"kernel {kernel!r} does not apply to {query.dtype} queries in lrsa::varlen; "
            f"one of {OP_KERNELS} or 'auto' does"
        )
    # The automatic choice for CUDA queries FlashAttention does not take (float32/64) is the
    # memory-efficient kernel, which the op has no backward for: such queries belong on the
    # eager path (``op_applies`` is False for them), or on the math kernel.
    raise ValueError(
        f"lrsa::varlen does not take {query.dtype} CUDA queries (the automatic kernel for them "
        f"is {kernel!r}, not one of {OP_KERNELS}); check op_applies first, or choose the "
        "'math' kernel"
    )


# Phases of the ops, named for the profiler (``benchmarks/train_model.py --profile``): where a
# call's host time goes. Only while a profiler runs: a range costs a dispatcher call otherwise.
# ``lrsa::graph`` is a replayed (or captured) call, whose steps do not show.
PHASES = (
    "lrsa::select", "lrsa::items", "lrsa::pack", "lrsa::kernel", "lrsa::unpack", "lrsa::graph",
)  # fmt: skip


def phase(name: str) -> contextlib.AbstractContextManager:
    """A profiler range named ``name`` (one of ``PHASES``) while a profiler runs, else nothing."""
    # torch's own flag (private): were it renamed, the ranges would go quietly and
    # tests/test_train_model_bench.py, which counts them, would fail.
    if getattr(profiler, "_is_profiler_enabled", False):
        return profiler.record_function(name)
    return contextlib.nullcontext()


# ---- the items' kernels: forward with log-sum-exp, and their own backward ----------------------
def items_forward(kernel, q, k, v, items, scale):
    """Output ``[Tq, Hq, D]`` and log-sum-exp ``[Hq, Tq]`` (float32) of the items. The math
    kernel's backward differentiates the reference again, so its log-sum-exp is left zero."""
    if kernel == "fa4":
        return lv.fa4_items(q, k, v, items, scale, return_lse=True)[:2]
    if kernel == "flash":
        return lv.flash_items(q, k, v, items, scale)[:2]
    out = lv.math_items(q, k, v, items, scale)
    return out, q.new_zeros(q.shape[1], q.shape[0], dtype=torch.float32)


def items_backward(kernel, grad, q, k, v, out, lse, items, scale):
    """``dq`` ``[Tq, Hq, D]``, ``dk``/``dv`` ``[Tk, Hkv, D]`` of the items: the CUDA kernels' own
    backward; for math, the reference attention's, differentiated by torch."""
    grad = grad.contiguous()
    cu_q, cu_k, max_q, max_k = items.cu_q, items.cu_k, items.max_q, items.max_k
    if kernel == "fa4":
        interface = importlib.import_module("flash_attn.cute.interface")
        return interface._flash_attn_bwd(
            q, k, v, out, grad, lse, scale, True, 0.0, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
            max_seqlen_q=max_q, max_seqlen_k=max_k,
        )[:3]  # fmt: skip
    if kernel == "flash":
        unused = torch.empty((), dtype=torch.int64, device=q.device)  # philox: no dropout
        return torch.ops.aten._flash_attention_backward(
            grad, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, True, unused, unused,
            scale=scale,
        )  # fmt: skip
    # torch.func, not torch.autograd: an op's implementation runs below the autograd dispatch key
    _, vjp = torch.func.vjp(lambda *qkv: lv.math_items(*qkv, items, scale), q, k, v)
    return vjp(grad)


# ---- the ops' steps: numbers, then tensors in; fresh tensors out (graphs.CallGraphs captures each)
def _select(rule: Rule, key, value) -> tuple[torch.Tensor]:
    with phase("lrsa::select"):
        return (selector(selector_for(key))(key, value, rule),)


def _attend(rule: Rule, scale: float, kernel: str, query, key, value, kept):
    """Output ``[B, n, Hq, D]`` and log-sum-exp ``[Hq, B * n]`` of the items under ``kept``."""
    # The items do not depend on the scores: a rule without score_v_ratio, as the backward's,
    # so that forward and backward share one cached packing.
    with phase("lrsa::items"):
        items = lv.items_of(query, kept, Rule(rule.sink, rule.lag, rule.keep))
    with phase("lrsa::pack"):
        k, v = lv.pack_items(key, value, items)
    with phase("lrsa::kernel"):
        out, lse = items_forward(kernel, lv.query_rows(query), k, v, items, scale)
    b, hq, n, d = query.shape
    # contiguous outputs, as the fake ones: a compiled graph plans with the fake strides
    return out.reshape(b, n, hq, d).contiguous(), lse.contiguous()


def _attend_backward(
    rule: Rule, scale: float, kernel: str, grad, query, key, value, out, lse, kept
):
    """Gradients of query, key and value (the op's layouts) from the output's."""
    with phase("lrsa::items"):  # for the packing and its backward
        items = lv.items_of(query, kept, rule)
    with phase("lrsa::pack"):
        k, v = lv.pack_items(key, value, items)
    b, hq, n, d = query.shape
    with phase("lrsa::kernel"):
        rows = (grad.reshape(b * n, hq, d), lv.query_rows(query), k, v,
                out.reshape(b * n, hq, d))  # fmt: skip
        dq, dk, dv = items_backward(kernel, *rows, lse, items, scale)
    with phase("lrsa::unpack"):
        dkey, dvalue = lv.pack_items_backward(dk, dv, key, value, items)
    dquery = dq.reshape(b, n, hq, d).transpose(1, 2)
    return dquery.contiguous(), dkey.contiguous(), dvalue.contiguous()


# The op's calls captured as CUDA graphs (``graphs``), of these kernels (both pass
# tests/test_varlen_op.py's capture test on an H100). FA4's replayed calls trained a 16K step
# 1.16x faster than its eager ones, 32K equal (docs/training.md).
GRAPH_KERNELS = ("fa4", "flash")
GRAPHS = graphs.CallGraphs(
    remedy="; `lrsa train --no-cuda-graphs` (model.cuda_graphs: false) runs the LRSA attention "
    "without graphs"
)


def _run(name: str, fn, tensors: tuple[torch.Tensor, ...], numbers: tuple, kernel: str):
    """``fn(*numbers, *tensors)``, replayed from a captured graph where the op's calls are."""
    call = functools.partial(fn, *numbers)
    if kernel in GRAPH_KERNELS and tensors[0].is_cuda:
        with phase("lrsa::graph"):
            return GRAPHS.run(name, call, tensors, numbers)
    return call(*tensors)


# ---- the ops -----------------------------------------------------------------------------------
@torch.library.custom_op("lrsa::varlen", mutates_args=())
def varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    sink: int,
    lag: int,
    keep: int,
    score_v_ratio: float,
    scale: float,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LRSA attention: query ``[B, Hq, n, D]``, key/value ``[B, Hkv, n, D]`` of one dtype;
    ``kernel`` is one of ``varlen.KERNELS`` that resolves to one of ``OP_KERNELS``. Returns the
    output ``[B, n, Hq, D]``, the log-sum-exp ``[Hq, B * n]`` and the kept positions
    ``[B, Hkv, P, keep]``."""
    rule, kernel = Rule(sink, lag, keep, score_v_ratio), _kernel(query, kernel)
    with torch.no_grad():
        # in a checkpointed layer's recompute, the forward's selection (replay)
        kept = replay.remembered(
            lambda k, v, r: _run("select", _select, (k, v), (r,), kernel)[0], key, value, rule
        )
        out, lse = _run("attend", _attend, (query, key, value, kept), (rule, scale, kernel), kernel)
    return out, lse, kept.contiguous()


@varlen.register_fake
def _(query, key, value, sink, lag, keep, score_v_ratio, scale, kernel):
    b, hq, n, d = query.shape
    # lagkv's own count (its max(0, ...) guards a dynamic length on either side of the first
    # compressed partition: one recompile there, none for longer sequences)
    parts = lagkv.compressed_partitions(n, Rule(sink, lag, keep))
    return (
        query.new_empty(b, n, hq, d),
        query.new_empty(hq, b * n, dtype=torch.float32),
        query.new_empty(b, key.shape[1], parts, keep, dtype=torch.long),
    )


@torch.library.custom_op("lrsa::varlen_backward", mutates_args=())
def varlen_backward(
    grad: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kept: torch.Tensor,
    sink: int,
    lag: int,
    keep: int,
    scale: float,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of query, key and value from the output's."""
    rule, kernel = Rule(sink, lag, keep), _kernel(query, kernel)
    tensors = (grad, query, key, value, out, lse, kept)
    with torch.no_grad():
        return _run("backward", _attend_backward, tensors, (rule, scale, kernel), kernel)


@varlen_backward.register_fake
def _(grad, query, key, value, out, lse, kept, sink, lag, keep, scale, kernel):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (query, key, value))


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, sink, lag, keep, _, scale, kernel = inputs
    out, lse, kept = output
    ctx.save_for_backward(query, key, value, out, lse, kept)
    ctx.numbers = (sink, lag, keep, scale, kernel)


def _backward(ctx, grad, _grad_lse, _grad_kept):
    query, key, value, out, lse, kept = ctx.saved_tensors
    dq, dk, dv = varlen_backward(grad, query, key, value, out, lse, kept, *ctx.numbers)
    return dq, dk, dv, None, None, None, None, None, None


varlen.register_autograd(_backward, setup_context=_setup_context)


def lrsa_varlen_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rule: Rule,
    scaling: float | None,
    *,
    kernel: str = "auto",
) -> torch.Tensor:
    """``lrsa_varlen_attention`` through the op: ``[B, n, Hq, D]``. Call where ``op_applies``
    to the queries in their autocast dtype."""
    query, key, value = lv.in_attention_dtype(query, key, value)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    sizes = (rule.sink, rule.lag, rule.keep, float(rule.score_v_ratio))
    return varlen(query, key, value, *sizes, float(scale), kernel)[0]
