"""GPU serving throughput, vanilla vLLM vs LagKV, in one process run (issue 21, item 5).

    python -m benchmarks.gpu_serving --json out/gpu_serving.json         # every workload
    python -m benchmarks.gpu_serving --scale 0.05 --sequences 4          # a smoke run
    python -m benchmarks.gpu_serving --merge a.json b.json                # one table of two runs

What is timed and the results: docs/gpu-serving.md. The engines run one after the other: one
serves every selected workload of its model and KV pool (after a warm-up generate), then is shut
down and its GPU memory freed before the next is built. The ``8b-*`` workloads run Llama-3.1-8B's
shape (``configs/llama-8b-class``) with random weights (``load_format="dummy"``: speed does not
depend on the values) and no tokenizer: prompts and outputs are token ids.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

# In-process engine cores: the step counter wraps the scheduler, and shutting an engine down
# frees its GPU memory in this process for the next one (vLLM's EngineCore.shutdown cleans up for
# that). The model runner may still run in a worker process (``--executor mp``), so
# main() has every process record its metrics into one folder.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from benchmarks import engine_common as common  # noqa: E402

CONFIGS = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class Family:
    """A model and its LagKV settings; ``model`` None means ``--model``."""

    sink: int
    lag: int
    ratio: float
    model: str | None
    dummy_weights: bool


FAMILIES = {
    "8b": Family(16, 1024, 0.25, str(CONFIGS / "llama-8b-class"), dummy_weights=True),
    "small": Family(32, 256, 0.25, None, dummy_weights=False),
}


@dataclass(frozen=True)
class Workload:
    name: str
    family: str
    sequences: int
    prompt: int
    new: int
    goal: float | None = None  # LagKV/vanilla throughput ratio to reach
    kv_bytes: int | None = None  # one fixed KV pool for both engines (kv_cache_memory_bytes)


WORKLOADS = {
    w.name: w
    for w in (
        Workload("8b-e2e", "8b", 64, 30_000, 256, goal=1.3),
        Workload("8b-prefill", "8b", 64, 30_000, 1, goal=1.05),
        Workload("small-e2e", "small", 128, 7936, 128, goal=1.0),
        Workload("small-prefill", "small", 128, 7936, 1),
        Workload("small-decode", "small", 128, 512, 512, goal=0.95),
        Workload("small-membound", "small", 128, 7936, 128, goal=2.0, kv_bytes=6 * 2**30),
    )
}
# Rows derived from two workloads' times: the decode part of 8b-e2e (its time minus 8b-prefill's).
DERIVED = {"8b-decode": ("8b-e2e", "8b-prefill", 2.5)}
ENGINES = ("vanilla", "lagkv")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument(
        "--model",
        help="model of the small-* workloads (default: the prepared default model)",
    )
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="skip torch.compile and CUDA graphs (default: off, as users serve)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="shrink prompt counts and lengths (lengths no further than "
        "sink + 4 lag, so LagKV still compresses), e.g. 0.05 for a smoke run",
    )
    parser.add_argument("--sequences", type=int, help="prompts per workload")
    parser.add_argument("--max-num-seqs", type=int, help="default: vLLM's")
    parser.add_argument("--gpu-memory-utilization", type=float, help="default: vLLM's")
    parser.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        help="prefix caching in both engines (default: vLLM's, on); the prompts share nothing, "
        "so off measures what caching costs the host",
    )
    parser.add_argument(
        "--executor",
        choices=["uni", "mp"],
        help="vLLM's executor for both engines: uni runs the model runner in the engine core's "
        "process, mp in a worker process (default: vLLM's, uni on one GPU)",
    )
    parser.add_argument("--json", help="write every result here")
    parser.add_argument(
        "--profile",
        nargs="+",
        choices=list(WORKLOADS),
        default=[],
        help="after the timed runs, run these workloads once more under cProfile (host) and "
        "the torch profiler (GPU kernels) and print where a step's time goes",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="run nothing: print one table of earlier --json reports of the same workloads, "
        "e.g. a --engines vanilla run and a --engines lagkv run on the same machine",
    )
    return parser.parse_args(argv)


def sized(w: Workload, scale: float, sequences: int | None) -> Workload:
    family = FAMILIES[w.family]
    floor = min(w.prompt, family.sink + 4 * family.lag)
    count = sequences or max(1, round(w.sequences * scale))
    return replace(w, sequences=count, prompt=max(floor, round(w.prompt * scale)))


def group_of(w: Workload) -> str:
    """Workloads of one model and KV pool share each engine."""
    return w.family + (f"-kv{w.kv_bytes / 2**30:g}GiB" if w.kv_bytes else "")


def max_model_len(family: str, scale: float) -> int:
    """Longest prompt + new tokens of the family's workloads (all of them, so that selecting
    fewer workloads builds the same engine), rounded up to 1024."""
    longest = max(
        sized(w, scale, 1).prompt + w.new for w in WORKLOADS.values() if w.family == family
    )
    return math.ceil(longest / 1024) * 1024


def engine_kwargs(args: argparse.Namespace, family: Family, w: Workload) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        dtype=args.dtype,
        max_model_len=max_model_len(w.family, args.scale),
        enforce_eager=args.enforce_eager,
        skip_tokenizer_init=True,  # token ids in and out: no tokenizer files, no detokenizing
        disable_log_stats=False,  # LLM turns stats off; get_metrics needs them
    )
    if family.dummy_weights:
        kwargs["load_format"] = "dummy"
    if w.kv_bytes:
        kwargs["kv_cache_memory_bytes"] = w.kv_bytes
    for name in ("max_num_seqs", "gpu_memory_utilization"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.prefix_caching is not None:
        kwargs["enable_prefix_caching"] = args.prefix_caching
    if args.executor is not None:
        kwargs["distributed_executor_backend"] = args.executor
    return kwargs


# ---- one engine ----------------------------------------------------------------------------------
def _worker_view(worker) -> dict[str, Any]:
    """Runs in the worker (collective_rpc): the backends its attention layers use and the CUDA
    graph mode it settled on (vLLM lowers it to what every backend supports)."""
    config = worker.vllm_config.compilation_config
    layers = config.static_forward_context.values()
    backends = {layer.attn_backend.get_name() for layer in layers if hasattr(layer, "attn_backend")}
    mode = config.cudagraph_mode
    return {"backends": sorted(backends), "cudagraph_mode": getattr(mode, "name", str(mode))}


def engine_info(llm) -> dict[str, Any]:
    config = llm.llm_engine.vllm_config
    cache, sched = config.cache_config, config.scheduler_config
    return llm.collective_rpc(_worker_view)[0] | {
        "executor": str(config.parallel_config.distributed_executor_backend),
        "block_size": cache.block_size,
        "num_gpu_blocks": cache.num_gpu_blocks,
        "pool_tokens": (cache.num_gpu_blocks or 0) * cache.block_size,
        "prefix_caching": cache.enable_prefix_caching,
        "max_num_seqs": sched.max_num_seqs,
        "max_num_batched_tokens": sched.max_num_batched_tokens,
        "async_scheduling": sched.async_scheduling,
    }


def _time_worker(worker) -> None:
    """Runs in the worker (collective_rpc): adds the time of its every ``execute_model`` and
    ``sample_tokens`` call to ``worker.lrsa_host_seconds``, once per worker."""
    if hasattr(worker, "lrsa_host_seconds"):
        return
    worker.lrsa_host_seconds = 0.0

    def record(seconds: float, _out) -> None:
        worker.lrsa_host_seconds += seconds

    for method in ("execute_model", "sample_tokens"):
        common.time_calls(worker, method, record)


def _worker_seconds(worker) -> float:
    return worker.lrsa_host_seconds


class StepCounter:
    """Counts the scheduler's steps and times the engine core's host phases (wrapping them):
    ``schedule``, the model runner's ``execute_model`` and ``sample_tokens`` (input preparation,
    metadata build, graph replay or launches), and ``update_from_output``; and ``worker``, the
    same two calls timed inside the worker. The token counts of vLLM's own stats are recorded
    only in steps that emit tokens, missing the middle prefill chunks. A small model's decode
    step is bound by host work: the phases say whose. With the model runner in the engine core's
    process (the ``uni`` executor) ``execute`` holds ``worker``; in a worker process (``mp``)
    ``execute`` is the hand-over only, and the two processes' phases overlap."""

    CORE_PHASES = ("schedule", "execute", "update")  # timed in the engine core
    PHASES = (*CORE_PHASES, "worker")

    def __init__(self, llm) -> None:
        self.steps = self.prefill_steps = self.prefill_tokens = 0
        self.seconds = dict.fromkeys(self.CORE_PHASES, 0.0)
        self.llm = llm
        scheduler = common.scheduler_of(llm)
        executor = llm.llm_engine.engine_core.engine_core.model_executor
        self.clock(scheduler, "schedule", "schedule", self.count)
        self.clock(executor, "execute_model", "execute")
        self.clock(executor, "sample_tokens", "execute")
        self.clock(scheduler, "update_from_output", "update")
        llm.collective_rpc(_time_worker)

    def clock(self, owner, method: str, phase: str, then=None) -> None:
        """Adds the time of every call of owner.method to phase; then(result) after each."""

        def record(seconds: float, out) -> None:
            self.seconds[phase] += seconds
            if then is not None:
                then(out)

        common.time_calls(owner, method, record)

    def count(self, out) -> None:
        if out.total_num_scheduled_tokens:
            self.steps += 1
            # A chunk of more than one token is prefill (a decode step schedules one).
            chunks = [n for n in out.num_scheduled_tokens.values() if n > 1]
            self.prefill_steps += bool(chunks)
            self.prefill_tokens += sum(chunks)

    def snapshot(self) -> dict[str, float]:
        return dict(
            steps=self.steps,
            prefill_steps=self.prefill_steps,
            prefill_tokens=self.prefill_tokens,
            worker_seconds=self.llm.collective_rpc(_worker_seconds)[0],
        ) | {f"{phase}_seconds": s for phase, s in self.seconds.items()}


METRICS = {"vllm:num_preemptions": "preemptions", "vllm:prefix_cache_hits": "prefix_cache_hits"}


def metric_totals(llm) -> dict[str, float]:
    from vllm.v1.metrics.reader import Counter

    totals = dict.fromkeys(METRICS.values(), 0.0)
    for metric in llm.get_metrics():
        if isinstance(metric, Counter) and metric.name in METRICS:
            totals[METRICS[metric.name]] += metric.value
    return totals


def generate(llm, prompts: list[list[int]], new: int):
    from vllm.inputs import TokensPrompt

    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    return llm.generate(inputs, common.greedy(new), use_tqdm=False)


LAGKV_SAMPLES = {
    "lagkv_compaction_seconds_sum": "compaction_seconds",
    "lagkv_compaction_seconds_count": "compaction_launches_timed",
    "lagkv_compressed_partitions_total": "compressed_partitions",
}


def lagkv_totals() -> dict[str, float]:
    """LagKV's own series: of this process and its workers where they record into one folder
    (``main``), else of this process. Compaction is timed with CUDA events on eager and
    piecewise steps only: inside a replayed decode graph nothing can be timed, its cost shows in
    ``ms_per_step`` instead."""
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    registry = get_prometheus_registry()
    return {
        name: registry.get_sample_value(sample) or 0.0 for sample, name in LAGKV_SAMPLES.items()
    }


def counters(llm, steps: StepCounter) -> dict[str, float]:
    """Every running total a workload's run is the difference of."""
    return steps.snapshot() | metric_totals(llm) | lagkv_totals()


def timed(llm, steps: StepCounter, w: Workload, prompts: list[list[int]]) -> dict[str, Any]:
    before = counters(llm, steps)
    started = time.perf_counter()
    outputs = generate(llm, prompts, w.new)
    seconds = time.perf_counter() - started
    prompt_tokens = sum(map(len, prompts))
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    run = dict(
        seconds=seconds,
        prompt_tokens=prompt_tokens,
        generated_tokens=generated,
        tokens_per_s=(prompt_tokens + generated) / seconds,
        requests_per_s=len(prompts) / seconds,
    )
    run |= {k: v - before[k] for k, v in counters(llm, steps).items()}
    run["prefill_tokens_per_step"] = run["prefill_tokens"] / max(1, run["prefill_steps"])
    run["ms_per_step"] = 1e3 * seconds / max(1, run["steps"])
    for phase in StepCounter.PHASES:
        run[f"{phase}_ms_per_step"] = 1e3 * run[f"{phase}_seconds"] / max(1, run["steps"])
    return run


def profiled(llm, steps: StepCounter, w: Workload, prompts: list[list[int]]) -> dict[str, Any]:
    """One more run of ``w`` under cProfile (the engine core runs in this process, so the
    scheduler and the KV manager are in it, and the model runner's host work with vLLM's
    in-process executor), then one under the torch profiler: the host functions and GPU kernels
    that cost most, per step. With the model runner in a worker process (``--executor mp``) its
    host work and kernels are not seen: ``worker`` says so."""
    import cProfile
    import pstats

    import torch
    from torch.profiler import ProfilerActivity, profile

    # The timed run left these prompts in the prefix cache: each profiled run starts without it.
    llm.reset_prefix_cache()
    first = steps.steps
    host = cProfile.Profile()
    host.runcall(generate, llm, prompts, w.new)
    n = max(1, steps.steps - first)
    stats = pstats.Stats(host)
    rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:PROFILE_ROWS]  # tottime
    top_host = [
        {"function": f"{Path(f).name}:{line}:{name}", "us_per_step": 1e6 * tt / n, "calls": nc}
        for (f, line, name), (_, nc, tt, _, _) in rows
    ]
    worker = llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend != "uni"
    if worker or not torch.cuda.is_available():
        return {"host": top_host, "gpu": [], "gpu_busy_us_per_step": 0.0, "worker": worker}
    llm.reset_prefix_cache()
    first = steps.steps
    with profile(activities=[ProfilerActivity.CUDA]) as gpu:
        generate(llm, prompts, w.new)
    n = max(1, steps.steps - first)
    events = gpu.key_averages()
    kernels = sorted(events, key=lambda e: -e.device_time_total)[:PROFILE_ROWS]
    top_gpu = [
        {"kernel": e.key[:90], "us_per_step": e.device_time_total / n, "calls": e.count}
        for e in kernels
    ]
    busy = sum(e.device_time_total for e in events) / n
    return {"host": top_host, "gpu": top_gpu, "gpu_busy_us_per_step": busy, "worker": False}


PROFILE_ROWS = 25


def print_profile(engine: str, name: str, prof: dict[str, Any]) -> None:
    if prof["worker"]:
        print(f"\n  {engine} {name}: the engine core only (the model runner is a worker "
              "process; --executor uni profiles it and the GPU)")  # fmt: skip
    else:
        print(f"\n  {engine} {name}: GPU busy {prof['gpu_busy_us_per_step']:.0f} us/step")
    for row in prof["gpu"]:
        print(f"    gpu  {row['us_per_step']:8.1f} us/step {row['calls']:7d}x  {row['kernel']}")
    for row in prof["host"]:
        print(f"    host {row['us_per_step']:8.1f} us/step {row['calls']:7d}x  {row['function']}")


def run_engine(
    engine: str,
    family: Family,
    model: str,
    kwargs: dict[str, Any],
    workloads: list[Workload],
    prompts: dict[str, list[list[int]]],
    profile: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Builds one engine, warms it up, times each workload, shuts it down. The LLM never leaves
    this function, so once it returns nothing holds the engine's GPU memory. A failure is
    recorded (what ran before it is kept) and the benchmark goes on with the next engine."""
    from vllm import LLM

    from lrsa_serve.engine import make_llm

    info: dict[str, Any] = {}
    runs: dict[str, Any] = {}
    llm = None
    started = time.perf_counter()
    try:
        if engine == "vanilla":
            llm = LLM(model=model, **kwargs)
        else:
            llm = make_llm(model, sink=family.sink, lag=family.lag, ratio=family.ratio, **kwargs)
        info = engine_info(llm) | {"build_seconds": time.perf_counter() - started}
        print(f"  {engine}: {json.dumps(info)}", flush=True)
        # Long enough to compress partitions: LagKV's Triton kernels compile at their first
        # launch, which must not land in the timed run; the same prompts warm vanilla up.
        warm = min(family.sink + 3 * family.lag, kwargs["max_model_len"] - 16)
        generate(llm, common.token_prompts(4, warm, seed=99), 16)
        steps = StepCounter(llm)
        for w in workloads:
            runs[w.name] = timed(llm, steps, w, prompts[w.name])
            print(f"  {engine} {w.name}: {json.dumps(runs[w.name])}", flush=True)
        for w in (w for w in workloads if w.name in profile):
            runs[w.name]["profile"] = profiled(llm, steps, w, prompts[w.name])
            print_profile(engine, w.name, runs[w.name]["profile"])
    except Exception as err:
        traceback.print_exc()
        info["error"] = repr(err)
    finally:
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
    return {"engine": info, "runs": runs}


def free_device_memory() -> str:
    import torch

    gc.collect()
    if not torch.cuda.is_available():
        return "no CUDA device"
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    return f"GPU memory free: {free / 2**30:.1f} of {total / 2**30:.1f} GiB"


# ---- the summary --------------------------------------------------------------------------------
def goal_status(ratio: float | None, goal: float | None) -> str:
    if goal is None:
        return ""
    if ratio is None:
        return f">= {goal:.2f}: n/a"
    return f">= {goal:.2f}: {'met' if ratio >= goal else 'not met'}"


def derived_runs(results: dict[str, Any]) -> dict[str, Any]:
    """Each derived row's per-engine time and tokens: the first workload's minus the second's."""
    derived = {}
    for name, (whole, part, goal) in DERIVED.items():
        if whole not in results or part not in results:
            continue
        row: dict[str, Any] = {"goal": goal}
        for engine in ENGINES:
            if engine in results[whole] and engine in results[part]:
                a, b = results[whole][engine], results[part][engine]
                seconds = a["seconds"] - b["seconds"]
                tokens = a["generated_tokens"] - b["generated_tokens"]
                row[engine] = {
                    "seconds": seconds,
                    "generated_tokens": tokens,
                    "tokens_per_s": tokens / seconds if seconds > 0 else None,
                }
        derived[name] = row
    return derived


def summary_rows(results: dict[str, Any], engines: dict[str, Any]) -> list[list[str]]:
    """The table's rows (``HEADER``). ``results``: per workload (and derived row) its goal, its
    engine group and each engine's run; ``engines``: per group each engine's info."""
    rows = []
    for name, res in results.items():
        runs = [res.get(engine) or {} for engine in ENGINES]
        speeds = [run.get("tokens_per_s") for run in runs]
        ratio = speeds[1] / speeds[0] if all(speeds) else None
        infos = [engines.get(res.get("group"), {}).get(engine, {}) for engine in ENGINES]
        rows.append(
            [
                name,
                *(f"{run['seconds']:.1f}" if run else "-" for run in runs),
                *(f"{speed:.0f}" if speed else "-" for speed in speeds),
                f"{ratio:.2f}x" if ratio is not None else "-",
                goal_status(ratio, res.get("goal")),
                " / ".join(",".join(info.get("backends", ["-"])) for info in infos),
                " / ".join(str(info.get("pool_tokens", "-")) for info in infos),
            ]
        )
    return rows


HEADER = (
    "workload|vanilla s|LagKV s|vanilla tok/s|LagKV tok/s|LagKV/vanilla|goal|"
    "backends (vanilla / LagKV)|pool tokens (vanilla / LagKV)"
).split("|")


def step_rows(results: dict[str, Any]) -> list[list[str]]:
    """Where the time goes (``STEP_HEADER``), one row per measured workload and engine."""
    rows = []
    for name, res in results.items():
        for engine in ENGINES:
            run = res.get(engine) or {}
            if "steps" not in run:
                continue  # derived rows and engines that did not run
            rows.append(
                [
                    name,
                    engine,
                    str(run["steps"]),
                    str(run["prefill_steps"]),
                    f"{run['prefill_tokens_per_step']:.0f}",
                    f"{run['ms_per_step']:.2f}",
                    " / ".join(f"{run.get(f'{p}_ms_per_step', 0):.2f}" for p in StepCounter.PHASES),
                    f"{run.get('preemptions', 0):.0f}",
                    f"{run.get('compressed_partitions', 0):.0f}",
                    f"{run.get('compaction_seconds', 0):.3f}",
                ]
            )
    return rows


STEP_HEADER = (
    "workload|engine|steps|prefill steps|prefill tokens/step|ms/step|"
    "host ms/step: schedule / execute+sample / update / worker|preemptions|"
    "partitions compressed|compaction s (eager steps)"
).split("|")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join([sys.executable, "-m", "benchmarks.gpu_serving", *given])
    if args.merge:
        return merged(args, command)
    from lrsa_serve.serving.cli import multiprocess_metrics

    multiprocess_metrics()  # before prometheus_client is first imported (with vLLM)
    import torch
    import vllm

    from lrsa_serve.models import resolve_model

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(f"{command}\n{gpu}; torch {torch.__version__}; vLLM {vllm.__version__}", flush=True)
    meta = {"command": command, "gpu": gpu, "torch": torch.__version__, "vllm": vllm.__version__}

    workloads = [sized(WORKLOADS[name], args.scale, args.sequences) for name in args.workloads]
    groups: dict[str, list[Workload]] = {}
    for w in workloads:
        groups.setdefault(group_of(w), []).append(w)
    seeds = {name: i for i, name in enumerate(WORKLOADS)}  # vanilla's prefix cache finds nothing
    results: dict[str, Any] = {}
    engines: dict[str, Any] = {}
    for group, members in groups.items():
        family = FAMILIES[members[0].family]
        model = family.model or resolve_model(args.model)
        kwargs = engine_kwargs(args, family, members[0])
        prompts = {
            w.name: common.token_prompts(w.sequences, w.prompt, seeds[w.name]) for w in members
        }
        print(f"\n[{group}] {model} {json.dumps(kwargs)}", flush=True)
        for w in members:
            results[w.name] = {"group": group, "goal": w.goal, "spec": asdict(w)}
        for engine in args.engines:
            out = run_engine(engine, family, model, kwargs, members, prompts, args.profile)
            print(f"  {engine} shut down; {free_device_memory()}", flush=True)
            engines.setdefault(group, {})[engine] = out["engine"]
            for name, run in out["runs"].items():
                results[name][engine] = run
    return report(args, meta, engines, results)


def report(
    args: argparse.Namespace, meta: dict[str, Any], engines: dict[str, Any], results: dict[str, Any]
) -> dict[str, Any]:
    """Prints the tables of a run (or of merged runs) and writes ``--json``. ``meta``: the
    command, GPU, torch and vLLM it ran with (``run`` names one workload's run elsewhere)."""
    for name in [name for name in results if name in DERIVED]:
        del results[name]  # recomputed from the runs, which a merge may have completed
    for name, row in derived_runs(results).items():
        results[name] = row | {"group": results[DERIVED[name][0]]["group"]}

    rows = summary_rows(results, engines)
    common.print_table(
        f"{meta['gpu']}, {args.dtype}, {'eager' if args.enforce_eager else 'compiled'}, "
        f"throughput = (prompt + generated tokens) / s",
        HEADER,
        rows,
    )
    for name, (whole, part, _) in DERIVED.items():
        if name in results:
            print(f"{name}: generated tokens / ({whole} time - {part} time)")
    steps_title = "steps (compaction inside replayed decode graphs is in ms/step)"
    common.print_table(steps_title, STEP_HEADER, step_rows(results))
    out = meta | {
        "args": vars(args),
        "engines": engines,
        "workloads": results,
        "summary": [dict(zip(HEADER, r, strict=True)) for r in rows],
        "steps": [dict(zip(STEP_HEADER, r, strict=True)) for r in step_rows(results)],
    }
    common.write_json(args.json, out)
    return out


def merged(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """One report of several: each engine's info and runs as its own report has them. Reports
    of different GPUs are refused: their ratio would compare the machines, not the engines."""
    reports = [json.loads(Path(path).read_text()) for path in args.merge]
    gpus = {r["gpu"] for r in reports}
    if len(gpus) != 1:
        raise SystemExit(f"gpu_serving: --merge needs reports of one GPU, got {sorted(gpus)}")
    engines: dict[str, Any] = {}
    results: dict[str, Any] = {}
    for r in reports:
        for group, infos in r["engines"].items():
            engines.setdefault(group, {}).update(infos)
        for name, row in r["workloads"].items():
            results.setdefault(name, {}).update(row)
    first = reports[0]
    # The title and the JSON give the settings the runs had (dtype, eager), not the merge's.
    args = argparse.Namespace(**(first["args"] | {"merge": args.merge, "json": args.json}))
    meta = {"command": command, "gpu": first["gpu"], "torch": first["torch"], "vllm": first["vllm"]}
    meta["merged"] = [r["command"] for r in reports]
    return report(args, meta, engines, results)


if __name__ == "__main__":
    main()
