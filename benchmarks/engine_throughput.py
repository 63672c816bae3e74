"""Decode throughput and time to first token, vanilla vLLM vs LagKV, in one process run.

    python -m benchmarks.engine_throughput --json out/engine_throughput.json

1. Time to first token of one ``--context``-token prompt alone (compressed history makes the
   later prefill chunks cheaper).
2. ``--sequences`` prompts of ``--context`` tokens together: prefill tokens/s, then decode
   tokens/s over the steps where every sequence is decoding (``--new-tokens`` each), and the
   scheduler's host time per step in each phase (``scheduler.schedule``, the KV manager's
   per-request work included).
Both engines run the same prompts, dtype and engine flags; ratios are LagKV / vanilla.
"""

from __future__ import annotations

import json
import time

from benchmarks import engine_common as common


def time_to_first_token(llm, prompt: list[int]) -> float:
    engine_ = llm.llm_engine
    started = time.perf_counter()
    common.add_requests(llm, {"ttft": prompt}, 1)
    while engine_.has_unfinished_requests():
        for out in engine_.step():
            if out.outputs and out.outputs[0].token_ids:
                elapsed = time.perf_counter() - started
    return elapsed


def batch_throughput(llm, prompts: list[list[int]], new_tokens: int) -> dict:
    engine_ = llm.llm_engine
    scheduler = common.scheduler_of(llm)
    scheduled: list[float] = []  # seconds of each scheduler.schedule call of the batch
    common.time_calls(scheduler, "schedule", lambda seconds, _: scheduled.append(seconds))
    common.add_requests(llm, {f"b{i}": prompt for i, prompt in enumerate(prompts)}, new_tokens)
    started = time.perf_counter()
    prefill_done = None
    decode_seconds, decode_tokens = 0.0, 0
    phase_schedule = {"prefill": [], "decode": []}
    while engine_.has_unfinished_requests():
        running = list(scheduler.running)
        all_decoding = len(running) == len(prompts) and all(
            r.num_computed_tokens >= r.num_prompt_tokens for r in running
        )
        step_started = time.perf_counter()
        calls = len(scheduled)
        engine_.step()
        phase_schedule["decode" if all_decoding else "prefill"] += scheduled[calls:]
        if all_decoding:
            prefill_done = prefill_done or step_started
            decode_seconds += time.perf_counter() - step_started
            decode_tokens += len(running)
    del scheduler.schedule  # the class's method again
    total_prompt = sum(len(p) for p in prompts)
    return {
        "prefill_tokens_per_s": total_prompt / ((prefill_done or time.perf_counter()) - started),
        "decode_tokens_per_s": decode_tokens / decode_seconds if decode_seconds else 0.0,
        "decode_steps_tokens": decode_tokens,
    } | {
        f"{phase}_schedule_ms": 1e3 * sum(times) / max(1, len(times))
        for phase, times in phase_schedule.items()
    }


def main(argv: list[str] | None = None) -> dict:
    parser = common.engine_parser(__doc__, eager=False)
    parser.add_argument("--context", type=int, default=6144)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument(
        "--prefix-caching",
        action="store_true",
        help="both engines with vLLM's prefix caching on: the prompts share nothing, so this "
        "measures what caching costs (LagKV: the raw copies its compactions make)",
    )
    args = parser.parse_args(argv)
    settings, flags, results = common.setup(args, args.context + args.new_tokens + 64)
    flags["enable_prefix_caching"] = args.prefix_caching
    if args.max_num_batched_tokens:
        flags["max_num_batched_tokens"] = args.max_num_batched_tokens
    prompts = common.token_prompts(args.sequences + 1, args.context, seed=2)
    for name, cfg in (("vanilla", None), ("lagkv", settings)):
        with common.engine(args.model, cfg, **flags) as llm:
            run = {"ttft_s": time_to_first_token(llm, prompts[-1])}
            run |= batch_throughput(llm, prompts[:-1], args.new_tokens)
        results["runs"][name] = run
        print(name, json.dumps(run), flush=True)

    vanilla, lagkv_run = results["runs"]["vanilla"], results["runs"]["lagkv"]
    rows = []
    for key, label in (("decode_tokens_per_s", "decode tok/s"),
                       ("prefill_tokens_per_s", "prefill tok/s"),
                       ("ttft_s", "TTFT s"),
                       ("prefill_schedule_ms", "schedule ms/step, prefill"),
                       ("decode_schedule_ms", "schedule ms/step, decode")):  # fmt: skip
        # A phase one engine never reached (e.g. vanilla never decodes every sequence at once
        # when its pool cannot hold them all) has no ratio.
        ratio = f"{lagkv_run[key] / vanilla[key]:.2f}x" if vanilla[key] else "-"
        rows.append([label, f"{vanilla[key]:.2f}", f"{lagkv_run[key]:.2f}", ratio])
    common.print_table(
        f"{args.sequences} x {args.context}-token prompts, {args.new_tokens} new tokens, "
        f"{args.dtype}, {'eager' if args.enforce_eager else 'compiled'}, {settings.short()}"
        f"{', prefix caching' if args.prefix_caching else ''}",
        ["metric", "vanilla", "lagkv", "lagkv/vanilla"],
        rows,
    )
    results["ratios"] = {row[0]: row[3] for row in rows}
    common.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
