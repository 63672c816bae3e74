"""``benchmarks/compaction_step.py`` runs end to end: its smoke shapes, on this CPU, under
Triton's interpreter (in a child process: the kernels pick interpreter or compiler at import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_times_every_row_and_counts_the_bytes(tmp_path):
    out = tmp_path / "step.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.compaction_step", "--smoke", "--json", str(out)],
        cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [r["rows"] for r in report["rows"]] == [1, 2] and report["keep"] == 16
    # 2 layers x 2 KV heads x (p and p+1 of K and V: 4 x 64 rows read, 2 x 16 kept rows
    # written) x 16 channels x 2 bytes, per request
    per_request = 2 * 2 * (4 * 64 + 2 * 16) * 16 * 2
    for row in report["rows"]:
        assert row["bytes"] == row["rows"] * per_request and row["ms"] > 0
    assert "| 2 |" in done.stdout and "L64 keep 16" in done.stdout
