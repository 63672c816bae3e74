"""``lrsa bench``: runs the engine benchmarks with --json (stand-in scripts here, through
--benchmarks-dir, that write results in the real modules' format; the real ones build four engines
each) and plots the JSON; bad results or a failing benchmark end in one line. By default it runs
the real ones as modules of the benchmarks package, wherever the working directory is."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lrsa_serve.cli import main as lrsa

PNG = b"\x89PNG\r\n\x1a\n"
SETTINGS = {"sink": 32, "lag": 256, "ratio": 0.25, "score_v_ratio": 1.0}
# The shapes benchmarks/engine_memory.py and engine_throughput.py write (lengths as JSON keys).
MEMORY = {
    "settings": SETTINGS, "dtype": "bfloat16", "block_size": 32, "fit_ratio": 2.5,
    "runs": {
        "vanilla": {"per_length": {"1024": {"peak_blocks": 33, "final_blocks": 33},
                                   "4096": {"peak_blocks": 129, "final_blocks": 129}},
                    "pool": {"max_running": 2, "preemptions": 6, "seconds": 9.0}},
        "lagkv": {"per_length": {"1024": {"peak_blocks": 26, "final_blocks": 22},
                                 "4096": {"peak_blocks": 50, "final_blocks": 46}},
                  "pool": {"max_running": 5, "preemptions": 0, "seconds": 6.5}},
    },
}  # fmt: skip
THROUGHPUT = {
    "settings": SETTINGS, "dtype": "bfloat16", "ratios": {},
    "runs": {
        "vanilla": {"ttft_s": 0.8, "prefill_tokens_per_s": 9000.0, "decode_tokens_per_s": 700.0,
                    "decode_steps_tokens": 512},
        "lagkv": {"ttft_s": 0.7, "prefill_tokens_per_s": 9500.0, "decode_tokens_per_s": 900.0,
                  "decode_steps_tokens": 512},
    },
}  # fmt: skip


def stub(folder: Path, name: str, result: dict, exit_code: int = 0) -> None:
    """A benchmark script that records its argv and writes ``result`` to --json."""
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(
        textwrap.dedent(f"""
        import json, sys
        argv = sys.argv[1:]
        print("{name} table", flush=True)
        open({str(folder / (name + ".argv"))!r}, "w").write(json.dumps(argv))
        if {exit_code}:
            sys.exit({exit_code})
        open(argv[argv.index("--json") + 1], "w").write(json.dumps({result!r}))
    """)
    )


def png_ok(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def test_runs_both_benchmarks_and_plots(tmp_path, capfd):
    scripts = tmp_path / "benchmarks"
    stub(scripts, "engine_memory", MEMORY)
    stub(scripts, "engine_throughput", THROUGHPUT)
    out = tmp_path / "out"
    code = lrsa(["bench", "--benchmarks-dir", str(scripts), "--out", str(out), "--ratio", "0.25",
                 "--lag", "256", "--memory-args", "--lengths 1024 4096 --requests 4"])  # fmt: skip
    assert code == 0
    printed = capfd.readouterr().out  # the scripts write to the real stdout
    assert "engine_memory table" in printed and "engine_throughput table" in printed
    memory_argv = json.loads((scripts / "engine_memory.argv").read_text())
    assert memory_argv == ["--json", str(out / "engine_memory.json"), "--lag", "256", "--ratio",
                           "0.25", "--lengths", "1024", "4096", "--requests", "4"]  # fmt: skip
    throughput_argv = json.loads((scripts / "engine_throughput.argv").read_text())
    assert "--lengths" not in throughput_argv  # each benchmark gets its own extra flags
    assert png_ok(out / "engine_memory.png") and png_ok(out / "engine_throughput.png")


def test_from_json_plots_without_running(tmp_path):
    (tmp_path / "engine_throughput.json").write_text(json.dumps(THROUGHPUT))
    out = tmp_path / "plots"
    assert lrsa(["bench", "throughput", "--from-json", str(tmp_path), "--out", str(out)]) == 0
    assert png_ok(out / "engine_throughput.png") and not (out / "engine_memory.png").exists()


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (lambda d: stub(d, "engine_memory", MEMORY, exit_code=3), ["memory"],
         "engine_memory.py failed with exit code 3"),
        (lambda d: None, ["memory"], "engine_memory.py not found"),
        (lambda d: stub(d, "engine_memory", {"runs": {"vanilla": {}}}), ["memory"],
         "expected a benchmark result with runs.vanilla and runs.lagkv"),
        (lambda d: stub(d, "engine_memory", {"runs": {"vanilla": {}, "lagkv": {}}}), ["memory"],
         "not engine_memory.py's format"),
        (lambda d: None, ["disk"], "unknown benchmark 'disk'"),
        (lambda d: None, ["memory", "--memory-args", "--lengths '1024"], "--memory-args"),
    ],
)  # fmt: skip
def test_failures_are_one_line(tmp_path, capsys, setup, args, message):
    scripts = tmp_path / "benchmarks"
    scripts.mkdir()
    setup(scripts)
    code = lrsa(["bench", *args, "--benchmarks-dir", str(scripts), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lrsa bench: error:") and message in err


def test_by_default_the_benchmarks_run_as_modules_from_any_directory(tmp_path):
    from lrsa_serve.bench import BENCHMARKS, benchmark_target
    from lrsa_serve.cli import build_parser

    for name, module in BENCHMARKS.items():
        target, label = benchmark_target(build_parser().parse_args(["bench", name]), name)
        assert target == ["-P", "-m", f"benchmarks.{module}"] and label == f"{module}.py"
        # elsewhere, with a `benchmarks` folder there that must not shadow the package
        (tmp_path / "benchmarks").mkdir(exist_ok=True)
        (tmp_path / "benchmarks" / "__init__.py").write_text("")
        done = subprocess.run([sys.executable, *target, "--help"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0 and "--json" in done.stdout, done.stderr[-2000:]
