"""``benchmarks/train_model.py`` runs end to end on its smoke model (CPU), and its ``--profile``
sees what the step did: every LRSA attention call, the checkpoint recompute's included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
