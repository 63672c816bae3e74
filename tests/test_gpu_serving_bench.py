"""The CPU-checkable parts of ``benchmarks/gpu_serving.py``: arguments, workload sizes, the
summary table with its goals (fabricated numbers), and one small LagKV run on the CPU engine
that counts steps and times the host phases. Its 8B-class config: test_bench_configs.py."""

from __future__ import annotations

import importlib

import pytest


@pytest.fixture(scope="module")
def bench():
    """The benchmark module, imported when these tests run, not at collection: importing it sets
    vLLM's environment for in-process engines."""
    return importlib.import_module("benchmarks.gpu_serving")


def test_defaults_are_vllms_and_every_workload_on_both_engines(bench):
    args = bench.parse_args([])
    assert args.workloads == list(bench.WORKLOADS) and args.engines == ["vanilla", "lagkv"]
    assert (args.dtype, args.enforce_eager, args.scale) == ("bfloat16", False, 1.0)
    assert args.gpu_memory_utilization is None and args.max_num_seqs is None
    args = bench.parse_args(
        ["--workloads", "8b-e2e", "small-membound", "--engines", "lagkv", "--enforce-eager",
         "--scale", "0.05", "--sequences", "3", "--gpu-memory-utilization", "0.8",
         "--max-num-seqs", "64", "--json", "x.json"]
    )  # fmt: skip
    assert args.workloads == ["8b-e2e", "small-membound"] and args.engines == ["lagkv"]
    assert (args.enforce_eager, args.scale, args.sequences) == (True, 0.05, 3)
    with pytest.raises(SystemExit):
        bench.parse_args(["--workloads", "8b-everything"])


def test_workloads_and_engine_arguments(bench):
    w = bench.WORKLOADS
    assert (w["8b-e2e"].sequences, w["8b-e2e"].prompt, w["8b-e2e"].new) == (64, 30_000, 256)
    assert w["8b-prefill"].new == 1 and w["small-decode"].prompt == 512
    assert w["small-membound"].kv_bytes == 6 * 2**30
    assert bench.max_model_len("8b", 1.0) == 30_720 and bench.max_model_len("small", 1.0) == 8192
    # A smoke scale shrinks counts and lengths, but lengths no further than sink + 4 lag.
    small = bench.sized(w["small-e2e"], 0.05, None)
    assert (small.sequences, small.prompt, small.new) == (6, 32 + 4 * 256, 128)
    assert bench.sized(w["8b-e2e"], 0.05, 2).sequences == 2
    assert bench.sized(w["small-decode"], 0.05, None).prompt == 512
    assert bench.max_model_len("small", 0.05) == 2048

    args = bench.parse_args(["--gpu-memory-utilization", "0.8"])
    kw = bench.engine_kwargs(args, bench.FAMILIES["8b"], w["8b-e2e"])
    assert kw["load_format"] == "dummy" and kw["skip_tokenizer_init"] is True
    assert kw["gpu_memory_utilization"] == 0.8 and "max_num_seqs" not in kw
    assert "attention_backend" not in kw and "kv_cache_memory_bytes" not in kw
    assert "enable_prefix_caching" not in kw  # vLLM's default
    assert "distributed_executor_backend" not in kw  # vLLM's own
    forced = bench.parse_args(["--executor", "mp"])
    kw = bench.engine_kwargs(forced, bench.FAMILIES["8b"], w["8b-e2e"])
    assert kw["distributed_executor_backend"] == "mp"
    uncached = bench.parse_args(["--no-prefix-caching"])
    kw = bench.engine_kwargs(uncached, bench.FAMILIES["8b"], w["8b-e2e"])
    assert kw["enable_prefix_caching"] is False
    kw = bench.engine_kwargs(args, bench.FAMILIES["small"], w["small-membound"])
    assert kw["kv_cache_memory_bytes"] == 6 * 2**30 and "load_format" not in kw
    assert bench.group_of(w["small-membound"]) != bench.group_of(w["small-e2e"])
    assert bench.group_of(w["small-decode"]) == bench.group_of(w["small-e2e"])


def run(seconds: float, prompt: int, generated: int) -> dict:
    return {"seconds": seconds, "prompt_tokens": prompt, "generated_tokens": generated,
            "tokens_per_s": (prompt + generated) / seconds}  # fmt: skip


def test_summary_ratios_goals_and_the_derived_decode_row(bench):
    info = {"vanilla": {"backends": ["FLASH_ATTN"], "pool_tokens": 400_000},
            "lagkv": {"backends": ["LAGKV_TRITON"], "pool_tokens": 390_000}}  # fmt: skip
    results = {
        "8b-e2e": {"group": "8b", "goal": 1.3,
                   "vanilla": run(200.0, 1000, 100), "lagkv": run(100.0, 1000, 100)},
        "8b-prefill": {"group": "8b", "goal": 1.05,
                       "vanilla": run(100.0, 1000, 10), "lagkv": run(99.0, 1000, 10)},
        "small-decode": {"group": "small", "goal": 0.95, "vanilla": run(10.0, 500, 500)},
    }  # fmt: skip
    for name, row in bench.derived_runs(results).items():
        results[name] = row | {"group": "8b"}
    decode = results["8b-decode"]
    assert decode["vanilla"]["seconds"] == 100.0 and decode["lagkv"]["seconds"] == 1.0
    assert decode["lagkv"]["generated_tokens"] == 90
    rows = {row[0]: row for row in bench.summary_rows(results, {"8b": info})}
    assert rows["8b-e2e"][1:6] == ["200.0", "100.0", "6", "11", "2.00x"]
    assert rows["8b-e2e"][6] == ">= 1.30: met"
    assert rows["8b-e2e"][7:] == ["FLASH_ATTN / LAGKV_TRITON", "400000 / 390000"]
    assert rows["8b-prefill"][5:7] == ["1.01x", ">= 1.05: not met"]
    assert rows["8b-decode"][5:7] == ["100.00x", ">= 2.50: met"]
    # One engine only: no ratio, the goal cannot be judged.
    assert rows["small-decode"][1:7] == ["10.0", "-", "100", "-", "-", ">= 0.95: n/a"]
    assert all(len(row) == len(bench.HEADER) for row in rows.values())


def test_goal_status(bench):
    assert bench.goal_status(2.5, 2.5) == ">= 2.50: met"
    assert bench.goal_status(2.49, 2.5) == ">= 2.50: not met"
    assert bench.goal_status(1.0, None) == ""


def test_step_rows_show_where_the_time_goes(bench):
    steps = dict(steps=400, prefill_steps=10, prefill_tokens=1000, prefill_tokens_per_step=100.0,
                 ms_per_step=5.0, schedule_ms_per_step=1.25, execute_ms_per_step=2.5,
                 update_ms_per_step=0.75, worker_ms_per_step=2.25)  # fmt: skip
    measured = run(2.0, 1000, 100) | steps
    lagkv = measured | dict(preemptions=3.0, compressed_partitions=12.0, compaction_seconds=0.25)
    results = {"small-e2e": {"group": "small", "vanilla": measured, "lagkv": lagkv},
               "8b-decode": {"group": "8b", "vanilla": {"seconds": 1.0}}}  # fmt: skip
    rows = bench.step_rows(results)
    host = "1.25 / 2.50 / 0.75 / 2.25"
    assert rows == [
        ["small-e2e", "vanilla", "400", "10", "100", "5.00", host, "0", "0", "0.000"],
        ["small-e2e", "lagkv", "400", "10", "100", "5.00", host, "3", "12", "0.250"],
    ]
    assert all(len(row) == len(bench.STEP_HEADER) for row in rows)


def test_merge_makes_one_table_of_an_engine_per_run(bench, tmp_path, capsys):
    def report(engine: str, seconds: tuple[float, float], gpu: str = "NVIDIA H100 80GB HBM3"):
        info = {"backends": [engine.upper()], "pool_tokens": 1000}
        workloads = [("8b-e2e", 1.3, 100), ("8b-prefill", 1.05, 10)]
        rows = {
            name: {"group": "8b", "goal": goal, engine: run(s, 1000, new)}
            for (name, goal, new), s in zip(workloads, seconds, strict=True)
        }
        args = vars(bench.parse_args(["--workloads", "8b-e2e", "8b-prefill", "--engines", engine]))
        path = tmp_path / f"{engine}-{gpu[-4:]}.json"
        path.write_text(bench.json.dumps({
            "command": f"run {engine}", "gpu": gpu, "torch": "2.13.0", "vllm": "0.32.0",
            "args": args, "engines": {"8b": {engine: info}}, "workloads": rows,
        }))  # fmt: skip
        return str(path)

    vanilla, lagkv = report("vanilla", (200.0, 100.0)), report("lagkv", (100.0, 99.0))
    out = tmp_path / "merged.json"
    merged = bench.main(["--merge", vanilla, lagkv, "--json", str(out)])
    rows = {row["workload"]: row for row in merged["summary"]}
    assert (
        rows["8b-e2e"]["LagKV/vanilla"] == "2.00x"
        and rows["8b-prefill"]["LagKV/vanilla"] == "1.01x"
    )
    assert rows["8b-decode"]["LagKV/vanilla"] == "100.00x"  # derived from the merged runs
    assert rows["8b-e2e"]["backends (vanilla / LagKV)"] == "VANILLA / LAGKV"
    assert merged["merged"] == ["run vanilla", "run lagkv"] and merged["gpu"].endswith("HBM3")
    assert bench.json.loads(out.read_text())["summary"] == merged["summary"]
    assert "2.00x" in capsys.readouterr().out
    # Runs on different GPUs compare the machines, not the engines: refused.
    with pytest.raises(SystemExit, match="one GPU"):
        bench.main(["--merge", vanilla, report("lagkv", (1.0, 1.0), gpu="NVIDIA H200")])


@pytest.mark.engine
def test_a_cpu_run_counts_the_steps_and_times_the_host_phases(bench, default_model):
    args = bench.parse_args(["--dtype", "float32", "--enforce-eager"])
    family = bench.FAMILIES["small"]  # S32 L256: chunks of 544, then 256 tokens
    w = bench.Workload("tiny", "small", sequences=2, prompt=1056, new=24)
    prompts = {"tiny": bench.common.token_prompts(2, w.prompt)}
    kwargs = bench.engine_kwargs(args, family, w)
    run = bench.run_engine("lagkv", family, default_model, kwargs, [w], prompts)["runs"]["tiny"]
    assert run["generated_tokens"] == 2 * w.new
    # Three prefill steps (544 + 256 + 256), the last of which samples the first token, then
    # one decode step per further token; each request compresses partitions 0-2 on the way.
    assert (run["prefill_steps"], run["steps"]) == (3, 3 + w.new - 1)
    assert run["compressed_partitions"] == 2 * 3
    schedule, execute, update, worker = (run[f"{p}_seconds"] for p in bench.StepCounter.PHASES)
    assert min(schedule, execute, update) > 0 and schedule + execute + update < run["seconds"]
    assert run["execute_ms_per_step"] == pytest.approx(1e3 * execute / run["steps"])
    # in-process (the CPU's uni executor) the worker's calls are the executor's, less its frame
    assert 0.5 * execute < worker <= execute


@pytest.mark.engine
def test_a_run_whose_model_runner_is_a_worker_process_reads_its_metrics(tmp_path, default_model):
    """``--executor mp``: the model runner runs in a worker process, and the compactions it
    counts reach the report (every process records into one folder)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "run.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_serving", "--workloads", "small-e2e",
         "--engines", "lagkv", "--executor", "mp", "--scale", "0.05", "--sequences", "2",
         "--dtype", "float32", "--enforce-eager", "--model", default_model, "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    engine = next(iter(report["engines"].values()))["lagkv"]
    assert engine["executor"] == "mp"
    run = report["workloads"]["small-e2e"]["lagkv"]
    assert run["generated_tokens"] == 2 * 128
    # two requests of 32 + 4 * 256 tokens: partitions 0-2 compress in each, in the worker
    assert run["compressed_partitions"] == 2 * 3
    # the worker's own time is read from its process: more than the engine core's hand-over
    assert run["worker_seconds"] > run["execute_seconds"] > 0
