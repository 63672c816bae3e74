"""``lrsa eval``: long-context accuracy under compression, per task x length x setting.

Against servers (any OpenAI-compatible endpoint; an ``lrsa serve`` reports its LagKV setting in
``/v1/models``, which labels the results)::

    lrsa eval --base-url http://127.0.0.1:8000 --api-key KEY --tasks passkey niah_single
    lrsa eval --base-url dense=http://h:8001 --base-url r0.25=http://h:8002   # a sweep by servers

In-process (vLLM engines built here, one at a time)::

    lrsa eval --model PATH --ratio 0.25 --lengths 2048 4096
    lrsa eval --sweep 0.5 0.25 0.125 --lag 256      # uncompressed baseline + three ratios

A server's LagKV settings are fixed when it starts, so a sweep against servers is one ``--base-url
NAME=URL`` per setting (start each with ``lrsa serve --ratio ...``); ``--sweep`` is for in-process
engines. Prompts are generated locally from seeds (the eval split of ``lrsa_serve.synthetic_tasks``
plus ``lrsa_serve.eval.ruler``), sized with ``--tokenizer`` (default: the model's, else the default
model's). Writes ``OUT/results.json``, ``OUT/report.md`` and PNG plots; prints the table. Exit
status 0 when every request was answered, 1 when some failed (the report lists them per task with
their messages), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from lrsa_serve.config import LagKVConfig, add_lagkv_arguments, lagkv_overrides
from lrsa_serve.errors import UserError

DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
DEFAULT_SWEEP = (0.5, 0.25, 0.125)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 2)[2]
    http = parser.add_argument_group("servers (OpenAI-compatible endpoints)")
    http.add_argument(
        "--base-url",
        action="append",
        metavar="[NAME=]URL",
        help="server to evaluate (repeat for several; NAME labels its results, "
        "default: its LagKV setting)",
    )
    http.add_argument("--api-key", help="bearer key (default: $LRSA_API_KEY)")
    http.add_argument("--served-model", help="model name to ask for (default: the listed one)")
    http.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="requests in flight per target (in-process: per batch; default 4)",
    )
    http.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    http.add_argument(
        "--api",
        choices=("completions", "chat"),
        default="completions",
        help="raw completion of the prompt (default) or one user chat turn",
    )

    engine = parser.add_argument_group("in-process engine")
    engine.add_argument("--model", help="model folder (default when no --base-url: the default)")
    add_lagkv_arguments(engine)
    engine.add_argument("--no-lagkv", action="store_true", help="stock vLLM, no compression")
    engine.add_argument(
        "--sweep",
        type=float,
        nargs="*",
        metavar="R",
        help="uncompressed baseline plus these kept ratios (default "
        f"{' '.join(map(str, DEFAULT_SWEEP))}) at --sink/--lag",
    )
    engine.add_argument("--dtype", default="auto", help="engine dtype (default auto)")
    engine.add_argument("--max-model-len", type=int, help="default: longest prompt + 512")
    engine.add_argument("--block-size", type=int, help="KV block size (default per platform)")
    engine.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / compile")
    engine.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other vllm.LLM argument (VALUE parsed as JSON if it can be)",
    )

    from lrsa_serve.eval.tasks import DEFAULT_TASKS

    tasks = parser.add_argument_group("tasks")
    tasks.add_argument(
        "--tasks",
        nargs="+",
        help="task names, or the groups all, ruler, qa (= the training generator's tasks); "
        f"default: {' '.join(DEFAULT_TASKS)}",
    )
    tasks.add_argument(
        "--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS, help="prompt lengths in tokens"
    )
    tasks.add_argument(
        "--depths", type=float, nargs="+", default=DEFAULT_DEPTHS, help="needle depths in [0, 1]"
    )
    tasks.add_argument("--samples", type=int, default=2, help="items per task x length x depth")
    tasks.add_argument("--seed", type=int, default=0, help="picks the items (eval seed split)")
    tasks.add_argument("--tokenizer", help="tokenizer folder used to size prompts")

    out = parser.add_argument_group("output")
    out.add_argument("--out", default="out/eval", help="folder for results.json, report.md, PNGs")
    out.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---- argument checks ----------------------------------------------------------------------------
def parse_target(text: str) -> tuple[str | None, str]:
    """``NAME=URL`` or ``URL`` (a URL may hold '=' in its query, never before '://')."""
    name, sep, url = text.partition("=")
    if sep and name and not any(c in name for c in ":/"):
        return name, url
    return None, text


def parse_engine_args(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--engine-arg {pair!r}: expected KEY=VALUE")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def check_arguments(args: argparse.Namespace) -> None:
    if any(n < 64 for n in args.lengths):
        raise UserError("--lengths must be at least 64 tokens")
    if any(not 0.0 <= d <= 1.0 for d in args.depths):
        raise UserError("--depths must be between 0 and 1")
    if args.samples < 1 or args.concurrency < 1:
        raise UserError("--samples and --concurrency must be at least 1")
    if args.base_url:
        if args.sweep is not None:
            raise UserError(
                "--sweep builds in-process engines; a server's LagKV settings are "
                "fixed at start, so sweep servers with one --base-url NAME=URL each"
            )
        engine_flags = {
            "--model": args.model,
            "--sink": args.sink,
            "--lag": args.lag,
            "--ratio": args.ratio,
            "--no-lagkv": args.no_lagkv or None,
        }
        if given := [flag for flag, value in engine_flags.items() if value is not None]:
            raise UserError(
                f"{', '.join(given)} set an in-process engine, not a server "
                "(use --tokenizer to choose the tokenizer of a --base-url run)"
            )
        named = [name for name, _ in map(parse_target, args.base_url) if name]
        if len(set(named)) != len(named):
            raise UserError("--base-url names must be distinct")
    if args.sweep is not None and args.no_lagkv:
        raise UserError("--sweep already includes the uncompressed baseline; drop --no-lagkv")
    if args.sweep and any(not 0.0 < r <= 1.0 for r in args.sweep):
        raise UserError("--sweep ratios must be in (0, 1]")


# ---- targets ------------------------------------------------------------------------------------
def build_targets(args: argparse.Namespace, max_tokens: int) -> list:
    from lrsa_serve.eval.runner import EngineTarget, HTTPTarget

    if args.base_url:
        api_key = args.api_key or os.environ.get("LRSA_API_KEY")
        options = dict(api=args.api, model=args.served_model, timeout=args.timeout)
        return [
            HTTPTarget(url, name=name, api_key=api_key, concurrency=args.concurrency, **options)
            for name, url in map(parse_target, args.base_url)
        ]
    from lrsa_serve.engine.api import lagkv_engine_kwargs
    from lrsa_serve.models import resolve_model

    model = resolve_model(args.model)
    overrides = lagkv_overrides(args)
    if args.sweep is not None:
        base = LagKVConfig.for_model(model, **(overrides | {"ratio": None}))
        ratios = args.sweep or list(DEFAULT_SWEEP)
        settings = [None] + [
            LagKVConfig.build(**(base.model_dump() | {"ratio": r})) for r in ratios
        ]
    elif args.no_lagkv:
        settings = [None]
    else:
        settings = [LagKVConfig.for_model(model, **overrides)]
    max_model_len = args.max_model_len or max(args.lengths) + max_tokens + 512
    engine_kwargs: dict[str, Any] = dict(dtype=args.dtype, seed=0, max_model_len=max_model_len)
    engine_kwargs |= parse_engine_args(args.engine_arg)
    if args.block_size:
        engine_kwargs["block_size"] = args.block_size
    if args.enforce_eager:
        engine_kwargs["enforce_eager"] = True
    for cfg in filter(None, settings):  # settings that cannot work fail here, before any start
        lagkv_engine_kwargs(model, cfg, **engine_kwargs)
    return [
        EngineTarget(model, cfg, api=args.api, batch=args.concurrency, **engine_kwargs)
        for cfg in settings
    ]


def tokenizer_path(args: argparse.Namespace, targets: list) -> str:
    from lrsa_serve.models import resolve_model

    if args.tokenizer:
        return args.tokenizer
    if not args.base_url:
        return targets[0].model
    for target in targets:  # an lrsa serve card names its model folder: use it if it is here
        if target.root and Path(target.root, "tokenizer_config.json").is_file():
            return target.root
    return str(resolve_model(None))


def run(args: argparse.Namespace) -> int:
    from lrsa_serve.eval import report
    from lrsa_serve.eval.runner import run_targets
    from lrsa_serve.eval.tasks import build_items, resolve_tasks
    from lrsa_serve.models import load_tokenizer

    check_arguments(args)
    names = [name.strip() for value in args.tasks or [] for name in value.split(",")]
    try:
        specs = resolve_tasks([name for name in names if name])
    except ValueError as e:
        raise UserError(str(e)) from None
    targets = build_targets(args, max(spec.max_tokens for spec in specs))
    for target in targets:
        if args.base_url:
            target.prepare()  # reads the model card: labels, and the tokenizer's folder
    tokenizer_folder = tokenizer_path(args, targets)
    tokenizer = load_tokenizer(tokenizer_folder)
    items = build_items(tokenizer, specs, args.lengths, args.depths, args.samples, args.seed)
    config = {
        "tasks": [spec.name for spec in specs],
        "lengths": list(args.lengths),
        "depths": list(args.depths),
        "samples": args.samples,
        "seed": args.seed,
        "api": args.api,
        "tokenizer": tokenizer_folder,
    }
    result = run_targets(targets, items, config, progress=not args.no_progress)
    written = report.write_outputs(result, Path(args.out), draw=not args.no_plots)

    print("\n".join(report.target_lines(result)))
    print()
    print(report.text_table(*report.table_rows(result)))
    if lines := report.failure_lines(result):
        print("\nFailures:", *lines, sep="\n")
    print("\nwrote " + ", ".join(str(path) for path in written.values()), file=sys.stderr)
    return 1 if any(r.failed for r in result.results) else 0
