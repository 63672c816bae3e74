"""``lrsa pipeline CONFIG.yaml``: post-train, export, serve, evaluate, report, in one command.

1. **train**: ``lrsa train`` (a subprocess) once per variant (e.g. LRSA and dense fine-tuning),
   each into ``OUT/train/VARIANT``; the trainer exports a servable HF checkpoint there.
2. **export**: check each exported checkpoint (config.json + safetensors) before serving it.
3. **serve + eval**: for the base model and every trained variant, in turn: start ``lrsa serve``
   on it (a subprocess on a free local port, its own process group, a random API key, the LagKV
   settings of the config given explicitly so every model runs under the same ones), wait for
   ``/ready``, run ``lrsa eval`` on the same locally generated items, stop the server.
4. **report**: ``OUT/report.md`` (training summary, accuracy per task x length for every model
   with the change against the base, failures) and ``OUT/report.json``; the eval's own table,
   JSON and plots in ``OUT/eval/``.

Every server and trainer it starts is stopped on the way out: on success, on failure, on Ctrl-C
and on SIGTERM/SIGHUP (the whole process group, SIGTERM then SIGKILL). Logs: ``OUT/logs/``.
``--resume`` continues an interrupted run in the same OUT with the same config: a variant that
finished training is reused, one that left checkpoints resumes from the latest, and a model
whose answers were kept (``OUT/eval/parts/``, none failed) is not served again; anything the
config changed since runs afresh.
Exit status: 0; 1 when some eval requests failed (the report lists them); 2 when a stage failed
(one line naming its log); 130 on Ctrl-C.

The config (YAML; every section optional but ``out``; unknown keys are errors)::

    name: cpu-smoke
    out: out/pipeline-cpu
    model: null                 # base model folder; null = the default model
    lagkv: {sink: 32, lag: 128, ratio: 0.25}
    train:
      args: {data: synthetic, steps: 4, max_len: 1536}   # any `lrsa train` flags
      variants: {lrsa: {}}     # name -> extra flags, e.g. {dense: {attention: dense}}
    serve:
      args: [--dtype, float32, --enforce-eager]           # any `lrsa serve` flags
      ready_timeout: 900
    eval: {tasks: [passkey], lengths: [1024], depths: [0.5], samples: 1, api: chat}
    base: {url: null, api_key: null}   # evaluate the base on a running server instead
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from lrsa_serve.errors import UserError
from lrsa_serve.pipeline.config import BaseSection, PipelineConfig, load_config
from lrsa_serve.pipeline.processes import stop_on_signals
from lrsa_serve.pipeline.report import report_markdown
from lrsa_serve.pipeline.stages import (
    evaluate_models,
    say,
    train_variant,
    training_summary,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 2)[2]
    parser.add_argument("config", help="pipeline YAML (see below and examples/pipeline-*.yaml)")
    parser.add_argument("--out", help="output folder (overrides the config's out)")
    parser.add_argument("--base-url", help="evaluate the base model on this running server")
    parser.add_argument("--base-api-key", help="its API key")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in OUT: reuse its finished trainings and evaluated "
        "models, resume a training from its last checkpoint",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.out:
        config.out = args.out
    if args.base_url:
        config.base = BaseSection(url=args.base_url, api_key=args.base_api_key)
    with stop_on_signals():
        return run_pipeline(config, resume=args.resume, progress=not args.no_progress)


def run_pipeline(config: PipelineConfig, *, resume: bool = False, progress: bool = True) -> int:
    from lrsa_serve.config import LagKVConfig
    from lrsa_serve.eval.report import table_rows, text_table, to_json, write_outputs
    from lrsa_serve.eval.tasks import build_items, resolve_tasks
    from lrsa_serve.models import load_tokenizer, resolve_model

    out = Path(config.out)
    base_model = str(resolve_model(config.model))
    settings = LagKVConfig.for_model(base_model, **config.lagkv.model_dump())
    try:
        specs = resolve_tasks(config.eval.tasks)
    except ValueError as e:
        raise UserError(f"eval.tasks: {e}") from None
    if not config.train.variants:
        raise UserError("train.variants is empty: nothing to compare with the base model")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    say(
        f"{config.name}: base {base_model}, LagKV {settings.short()}, "
        f"variants {', '.join(config.train.variants)}, out {out}"
    )

    checkpoints: dict[str, Path] = {}
    for variant in config.train.variants:
        checkpoints[variant] = train_variant(
            config, base_model, settings, variant, out, resume=resume
        )
        say(f"export {variant}: {checkpoints[variant]}")
    training = {variant: training_summary(folder) for variant, folder in checkpoints.items()}

    tokenizer = load_tokenizer(base_model)
    section = config.eval
    items = build_items(
        tokenizer, specs, section.lengths, section.depths, section.samples, section.seed
    )
    models: list[tuple[str, str, Any]] = [("base", base_model, settings)]
    models += [(variant, str(folder), settings) for variant, folder in checkpoints.items()]
    if section.uncompressed_baseline:
        models.append(("base uncompressed", base_model, None))
    run = evaluate_models(config, models, settings, items, out, progress, resume=resume)

    written = write_outputs(run, out / "eval")
    plots = {k: v for k, v in written.items() if k not in ("json", "markdown")}
    (out / "report.md").write_text(report_markdown(config, settings, run, training, plots, out))
    report = {
        "name": config.name,
        "base_model": base_model,
        "lagkv": settings.model_dump(),
        "training": training,
        "eval": to_json(run),
        "seconds": round(time.monotonic() - started, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    print(text_table(*table_rows(run)))
    say(f"done in {time.monotonic() - started:.0f}s: {out / 'report.md'}")
    return 1 if any(result.failed for result in run.results) else 0
