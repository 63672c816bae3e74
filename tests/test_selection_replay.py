"""Gradient checkpointing replays the forward's LRSA selection in the recompute
(``training/attention/replay.py``), instead of selecting a second time."""

from __future__ import annotations

import pytest
import torch

from benchmarks.random_models import random_model, tiny_config
from lrsa_serve import lagkv
from lrsa_serve.config import LagKVConfig
from lrsa_serve.training import model as model_mod
from lrsa_serve.training.attention import dispatch, replay, sequence_select

CFG = LagKVConfig(sink=4, lag=16, ratio=0.25)


class FlipFlopSelection:
    """``lagkv.select_all`` on odd calls; on even calls the first ``keep`` positions of every
    partition. A recompute that selects again therefore attends to other tokens than its forward
    did."""

    def __init__(self) -> None:
        self.real = lagkv.select_all
        self.calls = 0

    def __call__(self, key, value, cfg):
        self.calls += 1
        kept = self.real(key, value, cfg)
        if self.calls % 2:
            return kept
        starts = cfg.sink + cfg.lag * torch.arange(kept.shape[2], device=kept.device)
        first = starts[:, None] + torch.arange(cfg.keep, device=kept.device)
        return first.to(kept.dtype).expand_as(kept).clone()


@pytest.fixture
def selection(monkeypatch):
    flipflop = FlipFlopSelection()
    monkeypatch.setattr(lagkv, "select_all", flipflop)
    # the eager selector is lagkv.select_all, looked up when it is built
    sequence_select.selector.cache_clear()
    yield flipflop
    sequence_select.selector.cache_clear()
    dispatch.set_kernel("auto")


def loss_and_grads(model, ids, selection, checkpointing: bool, replay: bool):
    model_mod.prepare_for_training(model, checkpointing, replay_selection=replay)
    model.zero_grad(set_to_none=True)
    selection.calls = 0
    loss = model(input_ids=ids, labels=ids).loss
    forward_calls = selection.calls
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return float(loss.detach()), grads, forward_calls, selection.calls


@pytest.mark.parametrize("kernel", ["auto", "math"])  # on CPU: the dense reference; varlen
@pytest.mark.parametrize("compiled", [False, True])
def test_checkpoint_recompute_replays_the_forward_selection(selection, kernel, compiled):
    """With checkpointing the layers' selection runs once per forward (not again in the
    backward) and the gradients are exactly those without checkpointing, even with a selection
    that would change if run again; selecting again instead gives other gradients."""
    if compiled and kernel == "auto":
        pytest.skip("one compiled case is enough: the varlen one")
    layers = 2
    model = random_model(tiny_config("qwen2", vocab_size=300, num_hidden_layers=layers), seed=3)
    model = model.double()
    model_mod.set_attention(model, "lrsa", CFG, kernel)
    if compiled:
        model_mod.compile_layers(model)
    ids = torch.randint(0, 300, (2, 75), generator=torch.Generator().manual_seed(0))

    plain = loss_and_grads(model, ids, selection, checkpointing=False, replay=True)
    replayed = loss_and_grads(model, ids, selection, checkpointing=True, replay=True)
    again = loss_and_grads(model, ids, selection, checkpointing=True, replay=False)

    assert plain[2:] == (layers, layers)
    assert replayed[2:] == (layers, layers)  # no selection in the backward
    assert again[2:] == (layers, 2 * layers)  # the recompute selected again...
    assert replayed[0] == pytest.approx(plain[0], rel=1e-12)
    for got, want in zip(replayed[1], plain[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # ...and, with a selection that changes, differentiated another attention than it ran
    assert again[0] == pytest.approx(plain[0], rel=1e-12)
    differences = [float((g - w).abs().max()) for g, w in zip(again[1], plain[1], strict=True)]
    assert max(differences) > 1e-6


def test_a_replay_that_does_not_match_the_forward_is_an_error():
    forward, recompute = replay.checkpoint_contexts()
    rule = lagkv.Rule(sink=4, lag=16, keep=4, score_v_ratio=1.0)
    key = torch.zeros(1, 2, 68, 8)  # 3 compressed partitions of 4 kept tokens
    longer = torch.zeros(1, 2, 84, 8)  # 4
    kept = torch.zeros(1, 2, 3, 4, dtype=torch.long)
    with forward:
        got = replay.remembered(lambda *_: kept, key, key, rule)
    assert got is kept
    with recompute, pytest.raises(RuntimeError, match=r"expected kept positions of shape"):
        replay.remembered(lambda *_: kept, longer, longer, rule)
    with recompute:
        assert replay.remembered(lambda *_: None, key, key, rule) is kept
        with pytest.raises(RuntimeError, match="forward made only 1"):
            replay.remembered(lambda *_: kept, key, key, rule)
    # outside a checkpointed call nothing is remembered
    assert replay.remembered(lambda *_: "fresh", key, key, rule) == "fresh"


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_checkpoint_saves_the_rng_state_only_for_dropout(dropout):
    """The recompute replays the forward's random numbers where dropout draws them, so the
    gradients equal those without checkpointing; a model without dropout skips that (it
    cannot be done inside a CUDA graph capture)."""
    model = random_model(tiny_config("llama", vocab_size=300, attention_dropout=dropout), seed=3)
    model = model.double()
    model_mod.set_attention(model, "dense", CFG)
    assert model_mod.uses_dropout(model) == (dropout > 0)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model_mod.prepare_for_training(model, checkpointing)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain, checkpointed = grads(False), grads(True)
    keywords = model.model.layers[0]._gradient_checkpointing_func.keywords
    assert keywords["preserve_rng_state"] == (dropout > 0)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
