"""KV memory of vanilla vLLM vs LagKV, measured on the real engines in one process run.

    python -m benchmarks.engine_memory --json out/engine_memory.json

1. Blocks one sequence holds after its prompt and 16 generated tokens, per prompt length, read
   from vLLM's KV manager (not computed from the formula; the formula is printed beside it).
2. A fixed KV pool (``--pool-blocks``) under ``--requests`` concurrent long requests: the most
   requests that ran at once, and how many preemptions vLLM needed.
"""

from __future__ import annotations

import time

from benchmarks import engine_common as common
from lrsa_serve import lagkv


def blocks_per_length(llm, lengths: list[int], new_tokens: int) -> dict[int, dict]:
    engine_ = llm.llm_engine
    results = {}
    prompts = common.token_prompts(len(lengths), max(lengths))
    for length, prompt in zip(lengths, prompts, strict=True):
        common.add_requests(llm, {f"len{length}": prompt[:length]}, new_tokens)
        peak = last = 0
        while engine_.has_unfinished_requests():
            engine_.step()
            if held := sum(common.held_blocks(llm).values()):
                peak, last = max(peak, held), held
        results[length] = {"peak_blocks": peak, "final_blocks": last}
    return results


def concurrency(llm, requests: int, length: int, new_tokens: int) -> dict:
    engine_ = llm.llm_engine
    scheduler = common.scheduler_of(llm)
    prompts = common.token_prompts(requests, length, seed=1)
    common.add_requests(llm, {f"c{i}": prompt for i, prompt in enumerate(prompts)}, new_tokens)
    seen, most_running, started = {}, 0, time.perf_counter()
    while engine_.has_unfinished_requests():
        engine_.step()
        seen.update(scheduler.requests)
        most_running = max(most_running, len(scheduler.running))
    return {
        "max_running": most_running,
        "preemptions": sum(r.num_preemptions for r in seen.values()),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = common.engine_parser(__doc__, eager=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8000])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--pool-blocks", type=int, default=320, help="KV pool for part 2")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--request-length", type=int, default=4096)
    parser.add_argument("--fit-pool", type=int, default=1024, help="pool for the fit columns")
    args = parser.parse_args(argv)
    max_len = max(args.lengths + [args.request_length]) + args.new_tokens + 64
    settings, flags, results = common.setup(args, max_len)
    for name, cfg in (("vanilla", None), ("lagkv", settings)):
        with common.engine(args.model, cfg, **flags) as llm:
            per_length = blocks_per_length(llm, args.lengths, args.new_tokens)
            block_size = llm.llm_engine.vllm_config.cache_config.block_size
        fixed_pool = dict(num_gpu_blocks_override=args.pool_blocks)
        with common.engine(args.model, cfg, **fixed_pool, **flags) as llm:
            fit = concurrency(llm, args.requests, args.request_length, args.new_tokens)
        results["runs"][name] = {"per_length": per_length, "pool": fit}
    results["block_size"] = block_size

    rows = []
    for length in args.lengths:
        vanilla = results["runs"]["vanilla"]["per_length"][length]
        compressed = results["runs"]["lagkv"]["per_length"][length]
        formula = lagkv.resident_tokens(length + args.new_tokens - 1, settings.rule)
        # Sequences a pool fits is bounded by each one's peak (mid-compaction) footprint.
        fit = [args.fit_pool // run["peak_blocks"] for run in (vanilla, compressed)]
        rows.append([length, vanilla["final_blocks"], compressed["final_blocks"],
                     -(-formula // block_size),
                     f"{compressed['final_blocks'] / vanilla['final_blocks']:.0%}",
                     vanilla["peak_blocks"], compressed["peak_blocks"], *fit,
                     f"{fit[1] / max(1, fit[0]):.2f}x"])  # fmt: skip
    common.print_table(
        f"KV blocks per sequence after prompt + {args.new_tokens} tokens (block = {block_size} "
        f"tokens; {settings.short()}); sequences fitting {args.fit_pool} blocks",
        ["prompt", "vanilla", "lagkv", "formula", "lagkv/vanilla", "peak van", "peak lagkv",
         "fit van", "fit lagkv", "fit ratio"],
        rows,
    )  # fmt: skip
    pool = [results["runs"][n]["pool"] for n in ("vanilla", "lagkv")]
    common.print_table(
        f"{args.requests} requests of {args.request_length} tokens in a pool of "
        f"{args.pool_blocks} blocks",
        ["engine", "max running", "preemptions", "seconds"],
        [["vanilla", *pool[0].values()], ["lagkv", *pool[1].values()]],
    )
    ratio = pool[1]["max_running"] / max(1, pool[0]["max_running"])
    print(f"\nsequences running at once: {ratio:.2f}x vanilla")
    results["fit_ratio"] = ratio
    common.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
