"""The CPU image built from deploy/Dockerfile.cpu and run for real (``deploy/image_test.py``,
``make image-test``): opt-in, as it downloads ~1.5 GB and takes ~20 minutes on 2 cores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(
        not (shutil.which("buildah") and shutil.which("mmdebstrap")),
        reason="needs buildah and mmdebstrap (apt install buildah mmdebstrap)",
    ),
    pytest.mark.skipif(
        os.environ.get("LRSA_IMAGE_TEST") != "1",
        reason="builds and runs the image (~20 min): set LRSA_IMAGE_TEST=1, or make image-test",
    ),
]


def test_cpu_image_builds_runs_answers_and_stops(tmp_path):
    report = tmp_path / "image-test.json"
    done = subprocess.run(
        [sys.executable, "deploy/image_test.py", "--json", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(report.read_text())
    assert all(result["checks"].values()), result
    assert result["uid"] == 10001 and "Paris" in result["answer"]
    assert result["seconds_to_stop"] is not None and result["seconds_to_stop"] <= 60
