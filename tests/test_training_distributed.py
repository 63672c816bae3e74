"""torchrun + FSDP2 on CPU (gloo): two ranks with accumulation 1 take the same steps as one
process with accumulation 2 (same global batches, same loss curve, same exported weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.random_models import save_tiny_model

ARGS = [
    "--data", "synthetic", "--sink", "4", "--lag", "16", "--ratio", "0.25", "--max-len", "400",
    "--steps", "3", "--lr", "1e-3", "--batch-size", "2", "--synthetic-examples", "12",
    "--synthetic-eval-examples", "4", "--synthetic-min-tokens", "100",
    "--synthetic-max-tokens", "220", "--eval-every", "0", "--no-progress",
]  # fmt: skip


def losses(out_dir) -> list[tuple[int, float]]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_ranks_match_one_rank_with_accumulation(tmp_path):
    from safetensors.torch import load_file

    model = save_tiny_model(tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    from lrsa_serve.cli import main as lrsa_main

    # one process in this one; two ranks under torchrun
    assert (
        lrsa_main(["train", str(model), *ARGS, "--out", str(tmp_path / "one"), "--grad-accum", "2"])
        == 0
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    dist = subprocess.run(
        [*torchrun, "-m", "lrsa_serve.cli", "train", str(model), *ARGS,
         "--out", str(tmp_path / "two"), "--grad-accum", "1"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert dist.returncode == 0, dist.stderr[-2000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3]
    for (_, a), (_, b) in zip(one, two, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    w1 = load_file(tmp_path / "one" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "model.safetensors")
    assert sorted(w1) == sorted(w2)  # the tied LM head is stored once by both
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-5, atol=1e-6)
