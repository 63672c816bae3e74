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
        (
            ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'],
            "speculative decoding",
        ),  # fmt: skip
        (["--kv-cache-gib", "1.5"], "whole number of GiB"),
        (["/nonexistent/model"], "not a local HF model folder"),
        (["--max-tokens-cap", "-1"], "--max-tokens-cap must be >= 0"),
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
    for flag in ("--sink", "--lag", "--ratio", "--no-lagkv", "--api-key", "--max-model-len",
                 "--max-tokens-cap", "--enable-admin-routes"):  # fmt: skip
        assert flag in result.stdout


def test_serve_defaults_dtype_and_max_tokens(default_model):
    from lrsa_serve.serving.cli import build_parser, prepare

    args = build_parser().parse_args([])
    prepare(args, [])
    assert args.dtype == "float32"  # CPU: vLLM's compiled bf16 path answers garbage
    assert args.override_generation_config == {"max_new_tokens": 1024}

    argv = ["--dtype", "bfloat16", "--override-generation-config", '{"max_new_tokens": 7}']
    args = build_parser().parse_args(argv)
    prepare(args, argv)
    assert args.dtype == "bfloat16" and args.override_generation_config == {"max_new_tokens": 7}

    args = build_parser().parse_args(["--max-tokens-cap", "0"])
    prepare(args, [])
    assert "max_new_tokens" not in (args.override_generation_config or {})
