"""``lrsa bench``: vanilla vLLM vs LagKV, KV memory and throughput, measured and plotted.

Runs the engine benchmarks (the modules ``benchmarks.engine_memory`` and
``benchmarks.engine_throughput``, from the source tree or the installed package) as subprocesses,
each with ``--json``, so every engine they build lives and dies in its own process; their tables
print as they run. Then draws, from the JSON they wrote::

    OUT/engine_memory.png        KV blocks per sequence vs prompt length (after the prompt and at
                                 the peak), and requests running at once in a fixed KV pool
    OUT/engine_throughput.png    decode and prefill tokens/s, time to first token

Examples::

    lrsa bench --out out/bench --ratio 0.25 --lag 256
    lrsa bench memory --memory-args "--lengths 1024 4096 8000 --requests 16"
    lrsa bench --from-json out/bench          # plot JSON from an earlier run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from lrsa_serve.errors import UserError

BENCHMARKS = {"memory": "engine_memory", "throughput": "engine_throughput"}
PACKAGE = "benchmarks"
ENGINES = ("vanilla", "lagkv")  # the runs each benchmark's JSON holds
COLORS = {"vanilla": "tab:gray", "lagkv": "tab:green"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 2)[2]
    # no argparse choices: it checks a list default against them and refuses ["all"]
    parser.add_argument(
        "which",
        nargs="*",
        default=["all"],
        metavar="{memory,throughput,all}",
        help="benchmarks to run (default all)",
    )
    parser.add_argument("--out", default="out/bench", help="folder for the JSON and PNGs")
    parser.add_argument("--model", help="model folder (default: the default model)")
    parser.add_argument("--sink", type=int, help="LagKV sink S")
    parser.add_argument("--lag", type=int, help="LagKV partition size L")
    parser.add_argument("--ratio", type=float, help="LagKV kept fraction r")
    parser.add_argument("--dtype", help="engine dtype (default: the benchmarks' float32)")
    for name, module in BENCHMARKS.items():
        text = f"more {module}.py flags, in one quoted string (--{name}-args='...')"
        parser.add_argument(f"--{name}-args", default="", help=text)
    parser.add_argument(
        "--from-json",
        metavar="DIR",
        help="do not run anything: plot DIR/engine_*.json from an earlier run",
    )
    parser.add_argument(
        "--benchmarks-dir",
        type=Path,
        help="run DIR/engine_memory.py and DIR/engine_throughput.py as scripts instead of the "
        "benchmarks package's modules",
    )


def selected(which: list[str]) -> list[str]:
    if unknown := [name for name in which if name not in (*BENCHMARKS, "all")]:
        raise UserError(f"unknown benchmark {unknown[0]!r}: choose from memory, throughput, all")
    return list(BENCHMARKS) if "all" in which else list(dict.fromkeys(which))


def extra_flags(args: argparse.Namespace, name: str) -> list[str]:
    try:
        return shlex.split(getattr(args, f"{name}_args"))
    except ValueError as e:
        raise UserError(f"--{name}-args: {e}") from None


def benchmark_target(args: argparse.Namespace, name: str) -> tuple[list[str], str]:
    """The interpreter arguments that run benchmark ``name`` and how to name it in messages:
    ``-P -m benchmarks.NAME`` (-P: a ``benchmarks`` folder in the working directory must not
    shadow the package beside lrsa_serve), or ``DIR/NAME.py`` with ``--benchmarks-dir``."""
    module = BENCHMARKS[name]
    if args.benchmarks_dir is not None:
        script = args.benchmarks_dir / f"{module}.py"
        if not script.is_file():
            raise UserError(f"{script} not found")
        return [str(script)], script.name
    if importlib.util.find_spec(f"{PACKAGE}.{module}") is None:
        raise UserError(
            f"module {PACKAGE}.{module} not found: install lrsa-serve with its benchmarks "
            "package, or pass --benchmarks-dir"
        )
    return ["-P", "-m", f"{PACKAGE}.{module}"], f"{module}.py"


def run_benchmark(args: argparse.Namespace, name: str, out: Path) -> Path:
    target, label = benchmark_target(args, name)
    json_path = out / f"{BENCHMARKS[name]}.json"
    json_path.unlink(missing_ok=True)  # never plot a stale file as this run's result
    command = [sys.executable, *target, "--json", str(json_path)]
    for flag in ("model", "sink", "lag", "ratio", "dtype"):
        if getattr(args, flag) is not None:
            command += [f"--{flag}", str(getattr(args, flag))]
    command += extra_flags(args, name)
    print(f"[bench] {' '.join(command[1:])}", flush=True)
    code = subprocess.run(command).returncode
    if code != 0:
        raise UserError(f"{label} failed with exit code {code} (its output is above)")
    return json_path


def load_results(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such results file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, dict) or not set(ENGINES) <= set(runs):
        raise UserError(f"{path}: expected a benchmark result with runs.vanilla and runs.lagkv")
    return data


def _save(plt: Any, fig: Any, data: dict[str, Any], path: Path) -> Path:
    """Titles the figure with the run's settings and writes it to ``path``."""
    from lrsa_serve.eval.plots import save_figure

    s = data.get("settings") or {}
    fig.suptitle(
        f"LagKV S{s.get('sink')} L{s.get('lag')} r{s.get('ratio')} vs vanilla vLLM, "
        f"{data.get('dtype', '?')}",
        fontsize=10,
    )
    return save_figure(plt, fig, path)


def plot_memory(plt: Any, data: dict[str, Any], path: Path) -> Path:
    """Left: KV blocks one sequence holds vs its prompt length (after prompt + new tokens, and at
    the peak), both engines. Right: requests running at once, and preemptions, in a fixed pool."""
    runs = data["runs"]
    try:
        lengths = sorted(int(n) for n in runs["vanilla"]["per_length"])
        series = {
            (engine, kind): [runs[engine]["per_length"][str(n)][kind] for n in lengths]
            for engine in ENGINES
            for kind in ("final_blocks", "peak_blocks")
        }
        pools = [runs[engine]["pool"] for engine in ENGINES]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"engine_memory JSON lacks {e}: not engine_memory.py's format") from None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), width_ratios=[1.6, 1])
    for (engine, kind), values in series.items():
        style = "-" if kind == "final_blocks" else "--"
        label = f"{engine} ({'after prompt' if kind == 'final_blocks' else 'peak'})"
        left.plot(lengths, values, style, marker="o", color=COLORS[engine], label=label)
    left.set_xlabel("prompt length (tokens)")
    left.set_ylabel(f"KV blocks per sequence (block = {data.get('block_size', '?')} tokens)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    colors = [COLORS[engine] for engine in ENGINES]
    bars = right.bar(ENGINES, [p["max_running"] for p in pools], color=colors)
    right.bar_label(bars, [f"{p['preemptions']} preemptions" for p in pools], fontsize=8)
    right.set_ylabel("requests running at once (fixed KV pool)")
    return _save(plt, fig, data, path)


def plot_throughput(plt: Any, data: dict[str, Any], path: Path) -> Path:
    """Decode tokens/s, prefill tokens/s and time to first token, vanilla vs LagKV."""
    metrics = [
        ("decode_tokens_per_s", "decode tokens/s"),
        ("prefill_tokens_per_s", "prefill tokens/s"),
        ("ttft_s", "time to first token (s)"),
    ]
    runs = data["runs"]
    try:
        values = {key: [float(runs[e][key]) for e in ENGINES] for key, _ in metrics}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"engine_throughput JSON lacks {e}: not engine_throughput.py's format"
        ) from None
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    for ax, (key, label) in zip(axes, metrics, strict=True):
        bars = ax.bar(ENGINES, values[key], color=[COLORS[engine] for engine in ENGINES])
        ax.bar_label(bars, [f"{value:.3g}" for value in values[key]], fontsize=8)
        ax.set_title(label, fontsize=10)
    return _save(plt, fig, data, path)


PLOTTERS = {"memory": plot_memory, "throughput": plot_throughput}


def run(args: argparse.Namespace) -> int:
    from lrsa_serve.eval.plots import pyplot

    names = selected(args.which)
    for name in names:
        extra_flags(args, name)  # bad quoting fails before anything runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        results = {name: Path(args.from_json) / f"{BENCHMARKS[name]}.json" for name in names}
    else:
        results = {name: run_benchmark(args, name, out) for name in names}
    plt = pyplot("lrsa bench")
    if plt is None:
        return 0
    for name, json_path in results.items():
        png = PLOTTERS[name](plt, load_results(json_path), out / f"{BENCHMARKS[name]}.png")
        print(f"[bench] {name}: {json_path} -> {png}")
    return 0
