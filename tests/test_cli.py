"""The command line: one-line errors and exit codes, without starting an engine."""

from __future__ import annotations

import subprocess
import sys

import pytest


def lrsa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lrsa_serve.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_prepare_model_is_a_noop_the_second_time(default_model):
    result = lrsa("prepare-model")
    assert result.returncode == 0
    assert result.stdout.strip().splitlines()[-1] == default_model
    assert "already prepared" in result.stderr


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--ratio", "0"], "ratio"),
        (["--lag", "100"], "multiples of the KV block size 32"),
        (["--enable-prefix-caching"], "prefix caching"),
        (["--kv-cache-gib", "1.5"], "whole number of GiB"),
        (["/nonexistent/model"], "not a local HF model folder"),
    ],
)
def test_serve_refuses_bad_settings_in_one_line(
    default_model, flags, fragment, capsys, monkeypatch, tmp_path
):
    from lrsa_serve.cli import main

    # In-process (vLLM imported once for all cases); the env var main() sets is restored after.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert main(["serve", *flags]) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("lrsa serve: error:")]
    assert len(errors) == 1 and fragment in errors[0], stderr[-2000:]


def test_help_lists_the_lagkv_flags():
    result = lrsa("serve", "--help")
    assert result.returncode == 0
    for flag in ("--sink", "--lag", "--ratio", "--no-lagkv", "--api-key", "--max-model-len"):
        assert flag in result.stdout
