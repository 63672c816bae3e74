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
