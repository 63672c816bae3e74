"""The pipeline's stages: train each variant, check its export, serve and evaluate each model."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from lrsa_serve.config import LagKVConfig
from lrsa_serve.errors import UserError
from lrsa_serve.pipeline import resume as resume_mod
from lrsa_serve.pipeline.config import PipelineConfig
from lrsa_serve.pipeline.processes import ManagedServer, PipelineError, last_line, run_logged


def cli_flags(options: dict[str, Any]) -> list[str]:
    """``{max_len: 1536, resume: true, synthetic_tasks: [a, b]}`` -> ``--max-len 1536 --resume
    --synthetic-tasks a,b`` (false/null: left out)."""
    flags: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list | tuple):
            flags += [flag, ",".join(map(str, value))]
        else:
            flags += [flag, str(value)]
    return flags


def serving_length(model: str, wanted: int) -> int:
    """``--max-model-len`` for serving ``model``: ``wanted`` (the longest eval prompt, its
    answer and room for the chat template), but never past the model's own context
    (``max_position_embeddings`` of a local checkpoint), which vLLM refuses to exceed."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return wanted
    context = json.loads(config.read_text()).get("max_position_embeddings")
    return min(wanted, int(context)) if context else wanted


def say(message: str) -> None:
    print(f"[pipeline] {message}", flush=True)


def train_variant(
    config: PipelineConfig,
    base_model: str,
    settings: Any,
    variant: str,
    out: Path,
    *,
    resume: bool = False,
) -> Path:
    """``lrsa train`` into ``OUT/train/VARIANT``; returns the exported checkpoint folder. With
    ``resume``, what an interrupted run of the same command left is reused (``resume``)."""
    target = out / "train" / variant
    options = {**config.train.args, **config.train.variants[variant]}
    for reserved in ("out", *LagKVConfig.model_fields, "model"):
        if reserved in options:
            raise UserError(f"train.args: {reserved!r} is set by the pipeline (use lagkv/out)")
    args = ["train", base_model, "--out", str(target)]
    args += [*cli_flags(settings.model_dump()), *cli_flags(options), "--no-progress"]
    state = resume_mod.training_state(target, args) if resume else "fresh"
    if state == "done":
        say(f"train {variant}: reusing the finished run in {target}")
        return check_export(target)
    if state == "fresh":
        if target.exists():  # the pipeline's own folder: a new run trains afresh
            shutil.rmtree(target)
        resume_mod.record_training(target, args)
    command = [sys.executable, "-m", "lrsa_serve.cli", *args]
    if state == "resume":
        command.append("--resume")
    log = out / "logs" / f"train-{variant}.log"
    how = ", resuming from its last checkpoint" if state == "resume" else ""
    say(f"train {variant}: lrsa train {' '.join(command[4:])}  (log: {log}{how})")
    code = run_logged(command, log, append=state == "resume")
    if code != 0:
        raise PipelineError(
            f"training {variant} failed (exit {code}): {last_line(log)} (log: {log})"
        )
    return check_export(target)


def check_export(folder: Path) -> Path:
    config = folder / "config.json"
    if not config.is_file() or not any(folder.glob("*.safetensors")):
        raise PipelineError(f"{folder} holds no exported checkpoint (config.json + safetensors)")
    try:
        json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"{config}: not valid JSON ({e.msg})") from None
    return folder


def training_summary(folder: Path) -> dict[str, Any]:
    """The last training loss and the last held-out scores from the trainer's metrics.jsonl."""
    summary: dict[str, Any] = {"checkpoint": str(folder)}
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return summary
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            summary["step"], summary["loss"] = record.get("step"), record["loss"]
        summary |= {k: v for k, v in record.items() if k.startswith("eval_")}
    return summary


def check_base_server(target: Any, settings: Any) -> None:
    """A base model served elsewhere must run the settings the trained models get."""
    wanted = settings.model_dump()
    card = target.info.lagkv or {}
    if not target.info.lagkv_known or any(card.get(k) != v for k, v in wanted.items()):
        raise UserError(
            f"the base server at {target.base_url} runs LagKV "
            f"{target.info.setting}, the pipeline evaluates under "
            f"{settings.short()}"
        )


def evaluate_models(
    config: PipelineConfig,
    models: list[tuple[str, str, Any]],
    settings: Any,
    items: list,
    out: Path,
    progress: bool,
    *,
    resume: bool = False,
) -> Any:
    """Serve each (name, model folder, LagKV settings or None) in turn and evaluate it; or use
    ``base.url`` for the base model. Each model's answers are kept in ``OUT/eval/parts``; with
    ``resume`` a model whose kept answers still apply is not asked again (``resume``)."""
    from lrsa_serve.eval.runner import HTTPTarget, run_targets

    section = config.eval
    grid = section.model_dump(include={"lengths", "depths", "samples", "seed", "api"})
    eval_config = {"tasks": list(dict.fromkeys(item.task for item in items)), **grid}
    longest = max(section.lengths) + max(item.max_tokens for item in items) + 512
    options = dict(api=section.api, concurrency=section.concurrency, timeout=section.timeout)
    parts = resume_mod.EvalParts(out / "eval" / "parts")
    run = None
    for name, model, model_settings in models:
        on_base_url = name == "base" and config.base.url
        if on_base_url:
            served: list[str] | str = config.base.url
        else:
            flags = cli_flags(model_settings.model_dump()) if model_settings else ["--no-lagkv"]
            if "--max-model-len" not in config.serve.args:
                flags += ["--max-model-len", str(serving_length(model, longest))]
            served = serve_args = [*flags, *config.serve.args]
        key = resume_mod.eval_key(model, served, eval_config, items)
        part = parts.load(name, key, eval_config, items) if resume else None
        if part is not None:
            say(f"eval {name}: reusing its answers in {parts.path(name)}")
        elif on_base_url:
            target = HTTPTarget(config.base.url, name=name, api_key=config.base.api_key, **options)
            target.prepare()
            check_base_server(target, settings)
            say(f"eval {name}: {config.base.url} (already running)")
            part = run_targets([target], items, eval_config, progress=progress)
            parts.save(key, part)
        else:
            log = out / "logs" / f"serve-{name.replace(' ', '-')}.log"
            say(f"serve {name}: lrsa serve {model} {' '.join(serve_args)} (log: {log})")
            started = time.monotonic()
            with ManagedServer(
                model, serve_args, log, ready_timeout=config.serve.ready_timeout
            ) as server:
                say(f"serve {name}: ready on {server.url} in {time.monotonic() - started:.0f}s")
                target = HTTPTarget(server.url, name=name, api_key=server.api_key, **options)
                part = run_targets([target], items, eval_config, progress=progress)
            # the report outlives the server: say how to start it again
            command = shlex.join(["lrsa", "serve", model, *serve_args])
            part.targets[0].notes.append(f"served by `{command}` (stopped after its eval)")
            parts.save(key, part)
        run = part if run is None else run.merged(part)
    return run
