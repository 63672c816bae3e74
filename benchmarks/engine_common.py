"""What the engine benchmarks share: in-process engines (vanilla and LagKV, one after the
other in the same process), prompts of exact token lengths, greedy requests, the results JSON."""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# In-process engines: the benchmarks read the scheduler's KV manager directly.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

from lrsa_serve.config import LagKVConfig, add_lagkv_arguments, lagkv_overrides  # noqa: E402


def engine_parser(doc: str, eager: bool) -> argparse.ArgumentParser:
    """The flags both CPU engine benchmarks take, described by the first line of ``doc``.
    ``eager``: this benchmark's default for --enforce-eager (vLLM's torch.compile costs ~2 min
    per engine on 2 cores; worth it where step speed is measured, as `lrsa serve` compiles)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the default model)")
    parser.add_argument(
        "--dtype",
        default="float32",
        help="engine dtype (default float32: vLLM's compiled bfloat16 CPU path gives wrong "
        "tokens, on AVX512-BF16 CPUs too, and is slower on AVX2-only ones)",
    )
    parser.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=eager,
        help=f"skip vLLM's torch.compile (default here: {'on' if eager else 'off'})",
    )
    add_lagkv_arguments(parser)
    parser.add_argument("--json", default=None, help="write the results here")
    return parser


def setup(args: argparse.Namespace, max_model_len: int) -> tuple[LagKVConfig, dict, dict]:
    """The run's LagKV settings, the vllm.LLM arguments both engines get, and the results JSON
    before its runs (what both engines ran with)."""
    settings = LagKVConfig.build(**lagkv_overrides(args))
    shared = {"dtype": args.dtype, "enforce_eager": args.enforce_eager}
    results = {"settings": settings.model_dump(), **shared, "runs": {}}
    return settings, shared | {"max_model_len": max_model_len}, results


def write_json(path: str | None, results: dict[str, Any]) -> None:
    """``--json``: the results, where one was given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=2))


def token_prompts(count: int, length: int, seed: int = 0) -> list[list[int]]:
    """Distinct prompts of exactly ``length`` tokens (ordinary vocabulary ids)."""
    rng = random.Random(seed)
    return [[rng.randrange(1000, 40000) for _ in range(length)] for _ in range(count)]


@contextmanager
def engine(model: str | None, settings: LagKVConfig | None, **kwargs) -> Iterator:
    """A vllm.LLM: stock when ``settings`` is None, else with LagKV; shut down on exit."""
    from vllm import LLM

    from lrsa_serve.engine.api import lagkv_engine_kwargs
    from lrsa_serve.models import resolve_model

    folder = resolve_model(model)
    base = dict(seed=0, enable_prefix_caching=False) | kwargs
    llm = LLM(**lagkv_engine_kwargs(folder, settings, **base))
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def greedy(max_tokens: int) -> Any:
    """Sampling of exactly ``max_tokens`` greedy tokens (EOS ignored: both engines do the same
    work)."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def add_requests(llm, prompts: dict[str, list[int]], max_tokens: int) -> None:
    """Queues each prompt under its request id, to be run with ``llm.llm_engine.step()``."""
    from vllm.inputs import TokensPrompt

    params = greedy(max_tokens)
    for request_id, prompt in prompts.items():
        llm.llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def time_calls(owner: Any, method: str, record: Callable[[float, Any], None]) -> None:
    """Wraps ``owner.method`` on the instance: ``record(seconds, result)`` after every call
    (``del owner.method`` restores the class's)."""
    wrapped = getattr(owner, method)

    def timed(*args, **kwargs):
        started = time.perf_counter()
        out = wrapped(*args, **kwargs)
        record(time.perf_counter() - started, out)
        return out

    setattr(owner, method, timed)


def held_blocks(llm) -> dict[str, int]:
    """Physical KV blocks each running request holds now (freed entries excluded)."""
    manager = scheduler_of(llm).kv_cache_manager.coordinator.single_type_managers[0]
    null = manager.block_pool.null_block
    return {
        request_id: sum(block is not null for block in blocks)
        for request_id, blocks in manager.req_to_blocks.items()
    }


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    print("  ".join(str(h).rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths, strict=True)))
