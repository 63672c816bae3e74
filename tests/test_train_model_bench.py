"""``benchmarks/train_model.py`` runs end to end on its smoke model (CPU), and its ``--profile``
sees what the step did: every LRSA attention call, the checkpoint recompute's included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 2  # benchmarks.random_models.tiny_config


def test_smoke_run_profiles_every_attention_call(tmp_path):
    out = tmp_path / "train_model.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_model", "--smoke", "--lengths", "256",
         "--sink", "16", "--lag", "64", "--steps", "1", "--warmup", "1",
         "--checkpointing", "on", "off", "--lrsa-variants", "math", "--profile", "--eager-calls",
         "--triton-all-lengths",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["checkpointing"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"on", "off"}
    for checkpointing, row in rows.items():
        assert row["speedup"] > 0 and row["lrsa_eager_calls_speedup"] > 0
        assert row["lrsa_triton_all_speedup"] > 0  # on the CPU the same path: Triton needs CUDA
        assert row["dense_profile"]["ops"] == {}  # dense runs SDPA
        assert row["lrsa_profile"]["top_kernels"] == []  # no GPU kernels on the CPU
        ops = row["lrsa_profile"]["ops"]
        # one forward call per layer, and once more in each layer's recompute when checkpointing
        forward = LAYERS * (2 if checkpointing == "on" else 1)
        assert ops["lrsa::varlen"]["calls"] == forward, ops
        assert ops["lrsa::varlen_backward"]["calls"] == LAYERS, ops
        assert ops["lrsa::varlen"]["host_ms"] > 0 and row["lrsa_profile"]["wall_ms"] > 0
        # the phases of every call: the forward's (one selection per layer: the recompute
        # replays it), the backward's, which index and pack again, then unpack
        assert ops["lrsa::select"]["calls"] == LAYERS, ops
        assert ops["lrsa::kernel"]["calls"] == ops["lrsa::pack"]["calls"] == forward + LAYERS
        assert ops["lrsa::items"]["calls"] == forward + LAYERS
        assert ops["lrsa::unpack"]["calls"] == LAYERS
    assert "profile lrsa n=256 ckpt=on" in done.stdout


def test_step_graph_needs_cuda():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_model", "--smoke", "--step-graph"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--step-graph needs a CUDA device" in done.stderr.strip().splitlines()[-1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", ["dense", "lrsa"])
def test_gpu_captured_step_equals_the_eager_step(attention):
    """``CapturedStep`` on a compiled, checkpointed bf16-autocast model (LRSA: the op's calls
    inline in the capture): a replay gives the eager step's loss and gradients, and reads the
    parameters as they are when it runs (the optimizer updates them in place)."""
    from benchmarks.random_models import random_model, tiny_config
    from benchmarks.train_model import CapturedStep, qa_batch
    from lrsa_serve.config import LagKVConfig
    from lrsa_serve.training import loop
    from lrsa_serve.training import model as model_mod

    device = torch.device("cuda")
    with device:
        model = random_model(tiny_config("qwen2", vocab_size=300), seed=3)
    model_mod.set_attention(model, attention, LagKVConfig(sink=16, lag=64, ratio=0.25))
    model_mod.prepare_for_training(model, True)
    model_mod.compile_layers(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # the weights stay as they are
    autocast = loop.autocast_for(device, "bf16")
    batch = qa_batch(1024, 300, 64, device)

    def eager() -> tuple[float, list[torch.Tensor]]:
        optimizer.zero_grad(set_to_none=True)
        loss = loop.loss_sum(model, batch, autocast) / batch["targets"]
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.zero_grad(set_to_none=True)
        return float(loss), grads

    def same(got: tuple[float, list[torch.Tensor]], want: tuple[float, list[torch.Tensor]]):
        assert got[0] == pytest.approx(want[0], rel=1e-3)
        for g, w in zip(got[1], want[1], strict=True):  # FA2's atomics: ~1% apart; wrong: ~100%
            assert float((g - w).norm() / w.norm()) < 5e-2

    want = eager()
    step = CapturedStep(model, optimizer, batch, autocast, warmup=2)
    step.graph.replay()
    same((float(step.loss), [p.grad.clone() for p in model.parameters()]), want)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1.5)  # in place, as the optimizer writes
    step.graph.replay()
    replayed = (float(step.loss), [p.grad.clone() for p in model.parameters()])
    step.release()
    new = eager()
    assert new[0] != pytest.approx(want[0], rel=1e-3)
    same(replayed, new)
