"""Multi-turn long-document chat with prefix caching: vanilla vLLM + caching, LagKV without
caching, LagKV + caching, in one process run.

    python -m benchmarks.prefix_cache --json out/prefix_cache.json

1. One conversation per engine: a ``--document-tokens`` document, then ``--turns`` turns (a
   ``--question-tokens`` question, an ``--answer-tokens`` greedy answer); every turn re-sends the
   whole history. Time to first token of each turn, and the KV blocks the conversation holds at
   the end of its last turn.
2. ``--conversations`` such conversations taking turns in a seeded random order, over a pool of
   as many blocks as ``--pool-conversations`` vanilla conversations hold at their longest: the
   share of prompt tokens served from the cache, the later turns that found their history
   cached, and the mean time to first token (vanilla + caching vs LagKV + caching).
"""

from __future__ import annotations

import random
import time

from benchmarks import engine_common as common
from lrsa_serve.engine.api import default_block_size

# A later turn "found its history" when at least this share of its prompt was cached.
FOUND = 0.5


def run_turn(llm, request_id: str, prompt: list[int], answer_tokens: int) -> dict:
    """One turn alone: time to first token, the answer, cached prompt tokens and the blocks
    the request held at its last step."""
    engine = llm.llm_engine
    started = time.perf_counter()
    common.add_requests(llm, {request_id: prompt}, answer_tokens)
    ttft, held, final = None, 0, None
    while engine.has_unfinished_requests():
        # vLLM suffixes request ids; this request runs alone, so what is held is its own.
        held = sum(common.held_blocks(llm).values()) or held
        for out in engine.step():
            if ttft is None and out.outputs and out.outputs[0].token_ids:
                ttft = time.perf_counter() - started
            if out.finished:
                final = out
    return {
        "ttft_s": ttft,
        "answer": list(final.outputs[0].token_ids),
        "cached_tokens": final.num_cached_tokens or 0,
        "prompt_tokens": len(prompt),
        "held_blocks": held,
    }


class Conversation:
    """A document and questions; the history grows by each answer the engine gives."""

    def __init__(self, seed: int, args) -> None:
        rng = random.Random(seed)
        self.history = [rng.randrange(1000, 40000) for _ in range(args.document_tokens)]
        self.questions = [
            [rng.randrange(1000, 40000) for _ in range(args.question_tokens)]
            for _ in range(args.turns)
        ]
        self.turn = 0

    def take_turn(self, llm, request_id: str, answer_tokens: int) -> dict:
        """The next question after the history (``run_turn``); the answer joins the history."""
        prompt = self.history + self.questions[self.turn]
        result = run_turn(llm, request_id, prompt, answer_tokens)
        self.history = prompt + result.pop("answer")
        self.turn += 1
        return result


def one_conversation(llm, args, name: str) -> list[dict]:
    conversation = Conversation(0, args)
    return [
        conversation.take_turn(llm, f"{name}-{turn}", args.answer_tokens)
        for turn in range(args.turns)
    ]


def taking_turns(llm, args, name: str) -> dict:
    conversations = [Conversation(1 + i, args) for i in range(args.conversations)]
    order = [i for i in range(args.conversations) for _ in range(args.turns)]
    random.Random(args.seed).shuffle(order)
    results = []
    for step, index in enumerate(order):
        conversation = conversations[index]
        later_turn = conversation.turn > 0
        result = conversation.take_turn(llm, f"{name}-{step}", args.answer_tokens)
        results.append(result | {"later_turn": later_turn})
    later = [r for r in results if r["later_turn"]]
    return {
        "cached_share": sum(r["cached_tokens"] for r in results)
        / sum(r["prompt_tokens"] for r in results),
        "later_turns": len(later),
        "later_turns_found": sum(r["cached_tokens"] >= FOUND * r["prompt_tokens"] for r in later),
        "mean_ttft_s": sum(r["ttft_s"] for r in results) / len(results),
        "mean_later_ttft_s": sum(r["ttft_s"] for r in later) / len(later),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = common.engine_parser(__doc__, eager=True)
    parser.add_argument("--document-tokens", type=int, default=6000)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--question-tokens", type=int, default=24)
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--pool-conversations", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    block = default_block_size()
    longest = args.document_tokens + args.turns * (args.question_tokens + args.answer_tokens)
    max_model_len = -(-longest // block) * block  # the pool below must hold one
    settings, flags, results = common.setup(args, max_model_len)
    results["workload"] = {k: getattr(args, k) for k in ("document_tokens", "turns",
                           "question_tokens", "answer_tokens", "conversations",
                           "pool_conversations", "seed")}  # fmt: skip
    engines = {
        "vanilla + caching": (None, True),
        "LagKV": (settings, False),
        "LagKV + caching": (settings, True),
    }
    runs = results["runs"]
    for name, (engine_settings, caching) in engines.items():
        caching_flag = dict(enable_prefix_caching=caching)
        with common.engine(args.model, engine_settings, **caching_flag, **flags) as llm:
            runs[name] = {"conversation": one_conversation(llm, args, name)}
            print(f"{name}: {runs[name]['conversation']}", flush=True)

    # The pool: what vanilla vLLM needs for this many conversations at their longest (and
    # vLLM's null block).
    pool_blocks = args.pool_conversations * max_model_len // block + 1
    results["pool_blocks"] = pool_blocks
    for name, engine_settings in (("vanilla + caching", None), ("LagKV + caching", settings)):
        with common.engine(args.model, engine_settings, enable_prefix_caching=True,
                           num_gpu_blocks_override=pool_blocks, **flags) as llm:  # fmt: skip
            runs[name]["taking_turns"] = taking_turns(llm, args, name)
            print(f"{name}: {runs[name]['taking_turns']}", flush=True)
    report(results, args)
    common.write_json(args.json, results)
    return results


def report(results: dict, args) -> None:
    runs = results["runs"]
    vanilla, plain, cached = (runs[n] for n in ("vanilla + caching", "LagKV", "LagKV + caching"))

    def later_ttft(run: dict) -> float:
        later = run["conversation"][1:]
        return sum(t["ttft_s"] for t in later) / len(later)

    rows = [
        [name, f"{later_ttft(run):.2f}", run["conversation"][-1]["held_blocks"],
         run["conversation"][-1]["cached_tokens"]]
        for name, run in runs.items()
    ]  # fmt: skip
    common.print_table(
        f"One conversation: {args.document_tokens}-token document, {args.turns} turns",
        ["engine", "turns 2+ TTFT s", "blocks held (last turn)", "cached (last turn)"],
        rows,
    )
    print(f"  TTFT turns 2+: LagKV + caching / vanilla + caching = "
          f"{later_ttft(cached) / later_ttft(vanilla):.2f}x (goal <= 1.5x); "
          f"/ LagKV without caching = {later_ttft(cached) / later_ttft(plain):.2f}x "
          f"(goal <= 0.15x)")  # fmt: skip
    held = cached["conversation"][-1]["held_blocks"] / vanilla["conversation"][-1]["held_blocks"]
    print(f"  blocks held: LagKV + caching / vanilla + caching = {held:.0%} (goal <= 35%)")

    rows = [
        [name, f"{t['cached_share']:.0%}", f"{t['later_turns_found']}/{t['later_turns']}",
         f"{t['mean_ttft_s']:.2f}", f"{t['mean_later_ttft_s']:.2f}"]
        for name, t in ((n, runs[n]["taking_turns"]) for n in ("vanilla + caching",
                                                                 "LagKV + caching"))
    ]  # fmt: skip
    common.print_table(
        f"{args.conversations} conversations taking turns, a pool of {results['pool_blocks']} "
        f"blocks ({args.pool_conversations} vanilla conversations)",
        ["engine", "prompt tokens cached", "later turns found history", "mean TTFT s",
         "mean TTFT s (later turns)"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
