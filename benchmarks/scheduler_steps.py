"""The GPU serving workloads' scheduling, vanilla vLLM vs LagKV, on any machine: vLLM's own
scheduler and KV manager (LagKV's for LagKV) without a model.

    python -m benchmarks.scheduler_steps --workloads small-decode small-membound

Each step the scheduler schedules as in the engine, and a request whose prompt is done samples a
fixed token; nothing runs on a device. So the step structure (steps, prefill steps, tokens per
prefill step, preemptions) is the engine's on a GPU with the same pool and budget (the H200 run
of docs/gpu-serving.md: 92 prefill steps of 11,042 tokens in the 6 GiB run, here the same), and
the scheduler's host time per step is measured without a GPU or a model beside it. The two
engines' schedulers step alternately, so both see the same machine noise.

Pools: a workload's fixed KV pool (``kv_bytes``) in blocks of the model's KV size, else
``--pool-tokens``, else room for every sequence whole. Batch limits: vLLM's defaults for the
``LLM`` class on a large GPU (16,384 tokens, 1,024 sequences per step), as in the GPU runs.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from benchmarks import engine_common as common
from benchmarks.gpu_serving import FAMILIES, WORKLOADS, Workload, max_model_len, sized

BLOCK = 16  # vLLM's block size on CUDA
ENGINES = ("vanilla", "lagkv")


@dataclass
class Steps:
    """One engine's steps over a workload."""

    steps: int = 0
    prefill_tokens: list[int] = field(default_factory=list)  # per step with prompt tokens
    preemptions: int = 0
    schedule_prefill: list[float] = field(default_factory=list)  # seconds, steps with prefill
    schedule_decode: list[float] = field(default_factory=list)  # seconds, decode-only steps
    update: list[float] = field(default_factory=list)  # seconds, every step
    # per step: requests in prefill, prompt tokens, requests decoding, requests waiting
    timeline: list[tuple[int, int, int, int]] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        def ms(values: list[float]) -> float | None:
            return 1e3 * statistics.mean(values) if values else None

        prefill = self.prefill_tokens
        return {
            "steps": self.steps,
            "prefill_steps": len(prefill),
            "prefill_tokens_per_step": sum(prefill) / len(prefill) if prefill else None,
            "preemptions": self.preemptions,
            "schedule_ms_prefill": ms(self.schedule_prefill),
            "schedule_ms_decode": ms(self.schedule_decode),
            "update_ms": ms(self.update),
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--model", help="model of the small-* workloads (default: the default)")
    parser.add_argument("--scale", type=float, default=1.0, help="as gpu_serving's --scale")
    parser.add_argument("--sequences", type=int, help="prompts per workload")
    parser.add_argument("--pool-tokens", type=int, help="KV pool of workloads without a fixed one")
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prefix caching in both schedulers (default: on, as the GPU runs)",
    )
    parser.add_argument(
        "--timeline",
        nargs="+",
        choices=list(WORKLOADS),
        default=[],
        help="also print these workloads' steps: requests in prefill, prompt tokens, requests "
        "decoding and waiting (runs of equal steps as one row)",
    )
    parser.add_argument("--json", help="write every result here")
    return parser.parse_args(argv)


def model_of(args: argparse.Namespace, w: Workload) -> str:
    from lrsa_serve.models import resolve_model

    return FAMILIES[w.family].model or resolve_model(args.model)


def pool_blocks(args: argparse.Namespace, w: Workload, page_bytes: int) -> int:
    """``page_bytes``: one block of every layer's KV."""
    if w.kv_bytes:
        return w.kv_bytes // page_bytes
    if args.pool_tokens:
        return args.pool_tokens // BLOCK
    return w.sequences * -(-(w.prompt + w.new) // BLOCK) + 1


def make_scheduler(args: argparse.Namespace, w: Workload, engine: str):
    import torch
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from lrsa_serve.engine.api import lagkv_engine_kwargs
    from lrsa_serve.engine.kv_spec import LagKVAttentionSpec
    from lrsa_serve.engine.scheduler import LagKVScheduler

    family = FAMILIES[w.family]
    settings = common.LagKVConfig(sink=family.sink, lag=family.lag, ratio=family.ratio)
    model = model_of(args, w)
    kwargs = lagkv_engine_kwargs(
        model, settings if engine == "lagkv" else None, block_size=BLOCK,
        enable_prefix_caching=args.prefix_caching,
        max_model_len=max_model_len(w.family, args.scale),
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        skip_tokenizer_init=True,
    )  # fmt: skip
    kwargs.pop("attention_backend", None)  # a CUDA choice; nothing attends here
    config = EngineArgs(**kwargs).create_engine_config()
    # The model's KV as the GPU engines hold it (bf16), per layer: vLLM's own page size.
    model_config, parallel = config.model_config, config.parallel_config
    spec = FullAttentionSpec(
        block_size=BLOCK, num_kv_heads=model_config.get_num_kv_heads(parallel),
        head_size=model_config.get_head_size(), dtype=torch.bfloat16,
    )  # fmt: skip
    layers = model_config.get_num_layers(parallel)
    blocks = pool_blocks(args, w, layers * spec.page_size_bytes)
    config.cache_config.num_gpu_blocks = blocks
    if engine == "lagkv":
        spec = LagKVAttentionSpec.wrap(spec, settings)
    group = KVCacheGroupSpec(["attention"], spec)
    kv_config = KVCacheConfig(num_blocks=blocks, kv_cache_tensors=[], kv_cache_groups=[group])
    scheduler_cls = LagKVScheduler if engine == "lagkv" else Scheduler
    return scheduler_cls(
        vllm_config=config, kv_cache_config=kv_config, block_size=BLOCK, log_stats=True,
        structured_output_manager=StructuredOutputManager(config),
    )  # fmt: skip


def add_requests(scheduler, w: Workload) -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK, sha256)
    params = SamplingParams(max_tokens=w.new, ignore_eos=True)
    rng = random.Random(0)  # the same prompts for both engines
    for i in range(w.sequences):
        prompt = [rng.randrange(1000, 30000) for _ in range(w.prompt)]
        scheduler.add_request(Request(str(i), prompt, params, None, block_hasher=hasher))


def step(scheduler, steps: Steps) -> None:
    from vllm.v1.outputs import ModelRunnerOutput

    start = time.perf_counter()
    out = scheduler.schedule()
    scheduled = time.perf_counter() - start
    ids = list(out.num_scheduled_tokens)
    if not ids:
        return  # the step that only reports the last finished requests
    requests = [scheduler.requests[r] for r in ids]
    # schedule() has already counted the step's tokens as computed: the step started at
    # computed - n, and a request samples once its prompt is done (vLLM's is_prefill_chunk).
    chunks = [
        min(n, max(r.num_prompt_tokens - (r.num_computed_tokens - n), 0))
        for r, n in ((r, out.num_scheduled_tokens[r.request_id]) for r in requests)
    ]
    prompt = sum(chunks)
    prefilling = sum(c > 0 for c in chunks)
    steps.timeline.append((prefilling, prompt, len(requests) - prefilling, len(scheduler.waiting)))
    sampled = [[] if r.is_prefill_chunk else [7] for r in requests]
    output = ModelRunnerOutput(
        req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)}, sampled_token_ids=sampled
    )
    start = time.perf_counter()
    scheduler.update_from_output(out, output)
    steps.update.append(time.perf_counter() - start)
    steps.steps += 1
    steps.preemptions += len(out.preempted_req_ids or ())
    if prompt:
        steps.prefill_tokens.append(prompt)
        steps.schedule_prefill.append(scheduled)
    elif ids:
        steps.schedule_decode.append(scheduled)


def run_workload(args: argparse.Namespace, w: Workload) -> dict[str, Steps]:
    schedulers = {engine: make_scheduler(args, w, engine) for engine in ENGINES}
    steps = {engine: Steps() for engine in ENGINES}
    # As vLLM's engine core does once it is built: what exists now (imports, configs, the
    # block pools) leaves the cyclic GC's sight, so its full collections walk what serving
    # makes, not this process's start-up.
    gc.collect()
    gc.freeze()
    try:
        for scheduler in schedulers.values():
            add_requests(scheduler, w)
        while any(s.has_requests() for s in schedulers.values()):
            for engine, scheduler in schedulers.items():  # alternately: the same noise for both
                if scheduler.has_requests():
                    step(scheduler, steps[engine])
    finally:
        gc.unfreeze()
    return steps


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    def num(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    lines = [
        "| workload | engine | steps | prefill steps | prefill tokens / step | preemptions "
        "| schedule ms / prefill step | schedule ms / decode step | update ms / step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, engines in results.items():
        for engine, r in engines.items():
            lines.append(
                f"| {name if engine == ENGINES[0] else ''} | {engine} | {r['steps']} "
                f"| {r['prefill_steps']} | {num(r['prefill_tokens_per_step'], 0)} "
                f"| {r['preemptions']} | {num(r['schedule_ms_prefill'], 2)} "
                f"| {num(r['schedule_ms_decode'], 3)} | {num(r['update_ms'], 3)} |"
            )
    return "\n".join(lines)


def timeline_table(name: str, engine: str, timeline: list[tuple[int, int, int, int]]) -> str:
    """Runs of equal steps as one row."""
    lines = [
        f"{name}, {engine}:",
        "| steps | in prefill | prompt tokens / step | decoding | waiting |",
        "|---|---|---|---|---|",
    ]
    start = 0
    for i in range(1, len(timeline) + 1):
        if i == len(timeline) or timeline[i] != timeline[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            lines.append(f"| {span} | " + " | ".join(f"{v:,}" for v in timeline[start]) + " |")
            start = i
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for name in args.workloads:
        w = sized(WORKLOADS[name], args.scale, args.sequences)
        print(f"[scheduler_steps] {w.name}: {w.sequences} x {w.prompt} + {w.new}", flush=True)
        steps = run_workload(args, w)
        results[name] = {engine: s.row() for engine, s in steps.items()}
        for engine, s in steps.items():
            results[name][engine]["timeline"] = s.timeline
            if name in args.timeline:
                print(timeline_table(name, engine, s.timeline))
    common.write_json(args.json, {"args": vars(args), "results": results})
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
