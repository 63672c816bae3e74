"""The dense-vs-LRSA experiment script runs end to end (tiny random model, CPU): both variants
are trained and scored uncompressed and under LagKV, and the summary table is printed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_trains_and_scores_both_variants(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.lrsa_vs_dense", "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split()[0] for line in done.stdout.splitlines() if "%" in line]
    assert {"dense", "lrsa"} <= set(rows), done.stdout[-2000:]
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            results.update(json.loads(line))
    for variant in ("dense", "lrsa"):
        assert {"uncompressed", "lagkv"} <= set(results[variant])
        assert 0.0 <= results[variant]["lagkv"]["eval_exact_match"] <= 1.0
