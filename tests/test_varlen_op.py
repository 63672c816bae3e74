"""The LRSA attention as the custom op ``lrsa::varlen`` (``training/attention/op.py``): the same
output and gradients as the eager varlen path, and a compiled decoder layer traces it as one
graph (no break)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.random_models import random_model, tiny_config
from lrsa_serve.config import LagKVConfig
from lrsa_serve.training import model as model_mod
from lrsa_serve.training.attention import dispatch
from lrsa_serve.training.attention import op as op_mod
from lrsa_serve.training.attention import varlen as lv
from lrsa_serve.training.attention.op import lrsa_varlen_op

CFG = LagKVConfig(sink=4, lag=16, ratio=0.25)


@pytest.fixture(autouse=True)
def _restore():
    yield
    dispatch.set_kernel("auto")


def run_eagerly(monkeypatch) -> None:
    """Make the registered attention take its eager path (a graph break) where it would take the
    op, as it does for queries the op does not apply to."""
    monkeypatch.setattr(op_mod, "op_applies", lambda query: False)


@pytest.mark.parametrize("n", [1, 30, 36, 37, 100, 203])
@pytest.mark.parametrize("heads", [(4, 2), (6, 1), (3, 3)])
def test_op_matches_the_eager_path(n, heads):
    """Output and q/k/v gradients of the op (its explicit backward: the items' math backward, the
    gather's scatter) equal the eager path's (autograd), float64, batch 2, lengths off the
    partition grid and without any compressed partition."""
    gen = torch.Generator().manual_seed(n)
    hq, hkv = heads
    q = torch.randn(2, hq, n, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, hkv, n, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    grad = torch.randn(2, n, hq, 8, generator=gen, dtype=torch.float64)
    results = []
    for attend in (
        lambda *x: dispatch.lrsa_varlen(*x, CFG.rule, 0.3, kernel="math"),
        lambda *x: lrsa_varlen_op(*x, CFG.rule, 0.3),
    ):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = attend(*leaves)
        out.backward(grad)
        results.append([out.detach()] + [x.grad for x in leaves])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def decoder_layer_inputs(model, n: int = 75):
    hidden = torch.randn(2, n, model.config.hidden_size)
    positions = torch.arange(n)[None].expand(2, -1)
    return hidden, dict(
        attention_mask=None,
        position_ids=positions,
        position_embeddings=model.model.rotary_emb(hidden, positions),
    )


@pytest.mark.parametrize("op", [True, False])
def test_a_compiled_layer_traces_the_op_without_a_graph_break(op, monkeypatch):
    """With the op a decoder layer is one dynamo graph; the eager path breaks it (the check can
    fail)."""
    if not op:
        run_eagerly(monkeypatch)
    model = random_model(tiny_config("qwen2", vocab_size=300), seed=3)
    model_mod.set_attention(model, "lrsa", CFG, kernel="math")
    hidden, kwargs = decoder_layer_inputs(model)
    explained = torch._dynamo.explain(model.model.layers[0])(hidden, **kwargs)
    if op:
        assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    else:
        assert explained.graph_break_count >= 1


@pytest.mark.parametrize("compiled", [False, True])
def test_training_through_the_op_equals_the_eager_path(compiled, monkeypatch):
    """A tiny model with checkpointing (the recompute replays the selection): loss and every
    gradient through the op equal the eager path's, float64; compiled layers included."""
    ids = torch.randint(0, 300, (2, 75), generator=torch.Generator().manual_seed(0))
    results = {}
    for op in (False, True):
        with monkeypatch.context() as patch:
            if not op:
                run_eagerly(patch)
            model = random_model(tiny_config("qwen2", vocab_size=300), seed=3).double()
            model_mod.set_attention(model, "lrsa", CFG, kernel="math")
            model_mod.prepare_for_training(model, True)
            if compiled:
                model_mod.compile_layers(model)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        results[op] = (float(loss.detach()), [p.grad.clone() for p in model.parameters()])
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-12)
    for got, want in zip(results[True][1], results[False][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_a_kernel_the_op_cannot_run_is_a_clear_error():
    q, k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    with pytest.raises(ValueError, match="kernel 'efficient' does not apply"):
        lrsa_varlen_op(q, k, v, CFG.rule, None, kernel="efficient")


def _op_results(q, k, v, grad, rule, kernel="flash"):
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = lrsa_varlen_op(*leaves, rule, None, kernel=kernel)
    out.backward(grad)
    return [out.detach()] + [x.grad for x in leaves]


def _assert_same(got, want):
    # forward: deterministic kernels, bit for bit. FA2's backward sums dq with atomics in an
    # order that varies: bf16 gradients differ by an ulp here and there (0.1% of the elements
    # at 8K), so they are compared by norm; a replay of stale inputs would be off by ~100%.
    assert torch.equal(got[0], want[0])
    for g, w in zip(got[1:], want[1:], strict=True):
        assert float((g.float() - w.float()).norm() / w.float().norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n", [2048, 8192])
@pytest.mark.parametrize("kernel", ["flash", "fa4"])
def test_gpu_graphed_calls_equal_eager_ones(n, kernel):
    """On CUDA the op's calls are captured as graphs on their second use: a captured call, and
    a replay with other inputs, give the outputs and gradients of eager calls on those inputs
    (bf16, GQA 8/2, S64 L256 keep 64), for each kernel whose calls are captured."""
    if kernel == "fa4" and not lv.kernel_applies(
        "fa4", torch.empty(1, 64, device="cuda", dtype=torch.bfloat16)
    ):
        pytest.skip("needs flash-attn-4 on Hopper or Blackwell")
    assert kernel in op_mod.GRAPH_KERNELS
    rule = LagKVConfig(sink=64, lag=256, ratio=0.25).rule
    gen = torch.Generator(device="cuda").manual_seed(n)

    def inputs():
        q = torch.randn(2, 8, n, 64, generator=gen, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(2, 2, n, 64, generator=gen, device="cuda", dtype=torch.bfloat16)
                for _ in range(2))  # fmt: skip
        grad = torch.randn(2, n, 8, 64, generator=gen, device="cuda", dtype=torch.bfloat16)
        return q, k, v, grad

    a, b = inputs(), inputs()
    op_mod.GRAPHS.clear()
    eager_a = _op_results(*a, rule, kernel)  # first use: eager
    captured_b = _op_results(*b, rule, kernel)  # second: captured, then replayed
    assert len(op_mod.GRAPHS) == 3  # select, attend, backward
    replayed_a = _op_results(*a, rule, kernel)
    op_mod.GRAPHS.clear()
    eager_b = _op_results(*b, rule, kernel)
    _assert_same(replayed_a, eager_a)
    _assert_same(captured_b, eager_b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_checkpointed_training_with_graphs_equals_without(monkeypatch):
    """A small bf16 model with checkpointing (the recompute replays the selection into the
    captured attend graph), two steps: loss and gradients equal those of eager calls."""
    ids = torch.randint(0, 300, (2, 1024), generator=torch.Generator().manual_seed(0)).cuda()
    results = {}
    for graphed in (False, True):
        with monkeypatch.context() as patch:
            if not graphed:
                patch.setattr(op_mod.GRAPHS, "run", lambda name, fn, tensors, numbers: fn(*tensors))
            op_mod.GRAPHS.clear()
            model = random_model(tiny_config("qwen2", vocab_size=300), seed=3)
            model = model.to("cuda", torch.bfloat16)
            model_mod.set_attention(model, "lrsa", LagKVConfig(sink=16, lag=64, ratio=0.25))
            model_mod.prepare_for_training(model, True)
            for _ in range(2):  # the second step replays every call
                model.zero_grad()
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            assert (len(op_mod.GRAPHS) == 3) == graphed
        results[graphed] = (float(loss.detach()), [p.grad.float() for p in model.parameters()])
    assert results[True][0] == results[False][0]
    # bf16 weights and gradients: FA2's atomics leave the smallest gradients a percent or so
    # apart from run to run (1.2% seen); a wrong replay would be ~100% off
    for got, want in zip(results[True][1], results[False][1], strict=True):
        assert float((got - want).norm() / want.norm()) < 5e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_call_graphs_read_new_inputs_and_keep_the_latest_keys():
    """A replay reads the inputs of its call, not the capture's; past ``max_graphs`` keys the
    least recently used goes."""
    from lrsa_serve.training.attention.graphs import CallGraphs

    calls = CallGraphs(max_graphs=2)
    for n in (3, 4, 5):
        for start in range(3):  # eager, captured, replayed
            x = torch.arange(start, start + n, device="cuda", dtype=torch.float32)
            (y,) = calls.run("double", lambda t: (t * 2,), (x,), ())
            assert torch.equal(y, x * 2)
    assert len(calls) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_graphed_calls_of_sliced_inputs(monkeypatch):
    """Queries, keys and values sliced from one fused projection (strided views with gaps, as a
    fused-qkv model makes them): the eager, captured and replayed calls equal calls without
    graphs."""
    rule = LagKVConfig(sink=64, lag=256, ratio=0.25).rule
    gen = torch.Generator(device="cuda").manual_seed(5)
    fused = torch.randn(2, 2048, 12, 64, generator=gen, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(2, 2048, 8, 64, generator=gen, device="cuda", dtype=torch.bfloat16)

    def results():
        leaf = fused.clone().requires_grad_(True)
        q, k, v = (leaf[:, :, a:b].transpose(1, 2) for a, b in ((0, 8), (8, 10), (10, 12)))
        out = lrsa_varlen_op(q, k, v, rule, None, kernel="flash")
        out.backward(grad)
        return [out.detach(), leaf.grad]

    op_mod.GRAPHS.clear()
    graphed = [results() for _ in range(3)]
    assert len(op_mod.GRAPHS) == 3
    with monkeypatch.context() as patch:
        patch.setattr(op_mod.GRAPHS, "max_graphs", 0)
        eager = results()
    for got in graphed:
        _assert_same(got, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_a_call_that_cannot_be_captured_is_a_clear_error():
    """A call that synchronizes with the host cannot be captured: the error names the call and
    the remedy, and the device stays usable."""
    from lrsa_serve.training.attention.graphs import CallGraphs

    calls = CallGraphs(remedy="; run it eagerly")
    x = torch.arange(4, device="cuda", dtype=torch.float32)
    syncing = lambda t: (t * float(t.sum().item()),)  # noqa: E731
    assert torch.equal(calls.run("syncing", syncing, (x,), ())[0], x * 6)  # eager
    with pytest.raises(RuntimeError, match="capturing the call 'syncing'.*; run it eagerly"):
        calls.run("syncing", syncing, (x,), ())
    assert torch.equal(x + 1, torch.arange(1, 5, device="cuda", dtype=torch.float32))
