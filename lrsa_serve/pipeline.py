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
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from lrsa_serve.config import LagKVConfig
from lrsa_serve.errors import UserError


class PipelineError(UserError):
    """A stage failed; the message is one line and names the log to read."""


# ---- configuration ------------------------------------------------------------------------------
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# LagKVConfig's fields, each optional: what the config names overrides the base model's own.
LagKVSection = create_model(
    "LagKVSection",
    __base__=_Section,
    **{name: (field.annotation | None, None) for name, field in LagKVConfig.model_fields.items()},
)


class TrainSection(_Section):
    args: dict[str, Any] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"lrsa": {}})


class ServeSection(_Section):
    args: list[str] = Field(default_factory=list)
    ready_timeout: float = Field(900.0, gt=0)


class EvalSection(_Section):
    tasks: list[str] | None = None
    lengths: list[int] = Field(default_factory=lambda: [2048, 4096])
    depths: list[float] = Field(default_factory=lambda: [0.1, 0.5, 0.9])
    samples: int = Field(2, ge=1)
    seed: int = 0
    api: Literal["completions", "chat"] = "chat"
    concurrency: int = Field(4, ge=1)
    timeout: float = Field(600.0, gt=0)
    uncompressed_baseline: bool = False  # also the base model without LagKV


class BaseSection(_Section):
    url: str | None = None
    api_key: str | None = None


class PipelineConfig(_Section):
    name: str = "pipeline"
    out: str
    model: str | None = None
    lagkv: LagKVSection = Field(default_factory=LagKVSection)
    train: TrainSection = Field(default_factory=TrainSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    base: BaseSection = Field(default_factory=BaseSection)


def load_config(path: str | Path) -> PipelineConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise UserError(f"{path}: {where}: {first['msg']}") from None


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


# ---- subprocesses -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the process's whole group (its own session: engine workers included), then
    SIGKILL what is left after ``grace`` seconds."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    try:  # children may outlive the leader; the group id is the leader's pid
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    return next((line for line in reversed(lines) if line), "(empty log)")


def run_logged(command: Sequence[str], log_path: Path, echo: bool = True) -> int:
    """Run to completion in its own process group, copying its output to ``log_path`` (and to
    stdout when ``echo``); killed with its group if we are interrupted."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        process = subprocess.Popen(
            list(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        try:
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                log.flush()
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            return process.wait()
        finally:
            stop_group(process, grace=10)


class ManagedServer:
    """``lrsa serve`` in its own process group on a free port; ready when ``/ready`` says 200."""

    def __init__(
        self,
        model: str,
        serve_args: Sequence[str],
        log_path: Path,
        *,
        ready_timeout: float = 900.0,
        command: Sequence[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = secrets.token_urlsafe(16)  # only the pipeline talks to its servers
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self.command = (
            list(command)
            if command is not None
            else [
                sys.executable,
                "-m",
                "lrsa_serve.serving.cli",
                model,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--api-key",
                self.api_key,
                *serve_args,
            ]
        )
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ManagedServer:
        import httpx

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # each server its own metrics folder
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            deadline = time.monotonic() + self.ready_timeout
            while True:
                if self.process.poll() is not None:
                    raise PipelineError(
                        f"the server exited with code {self.process.returncode} before it was "
                        f"ready: {last_line(self.log_path)} (log: {self.log_path})"
                    )
                try:
                    if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise PipelineError(
                        f"the server was not ready after {self.ready_timeout:g}s "
                        f"(log: {self.log_path})"
                    )
                time.sleep(1)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt (as Ctrl-C does) so every ``finally`` that
    stops a server runs; the previous handlers come back afterwards."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---- stages -------------------------------------------------------------------------------------
def say(message: str) -> None:
    print(f"[pipeline] {message}", flush=True)


def lagkv_flags(settings: LagKVConfig) -> list[str]:
    return cli_flags(settings.model_dump())


def train_variant(
    config: PipelineConfig, base_model: str, settings: Any, variant: str, out: Path
) -> Path:
    """``lrsa train`` into ``OUT/train/VARIANT``; returns the exported checkpoint folder."""
    target = out / "train" / variant
    if target.exists():  # the pipeline's own folder: a new run trains afresh
        shutil.rmtree(target)
    options = {**config.train.args, **config.train.variants[variant]}
    for reserved in ("out", *LagKVConfig.model_fields, "model"):
        if reserved in options:
            raise UserError(f"train.args: {reserved!r} is set by the pipeline (use lagkv/out)")
    command = [
        sys.executable,
        "-m",
        "lrsa_serve.cli",
        "train",
        base_model,
        "--out",
        str(target),
        *lagkv_flags(settings),
        *cli_flags(options),
        "--no-progress",
    ]
    log = out / "logs" / f"train-{variant}.log"
    say(f"train {variant}: lrsa train {' '.join(command[4:])}  (log: {log})")
    code = run_logged(command, log)
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
) -> Any:
    """Serve each (name, model folder, LagKV settings or None) in turn and evaluate it; or use
    ``base.url`` for the base model."""
    from lrsa_serve.eval.runner import HTTPTarget, run_targets

    section = config.eval
    eval_config = {
        "tasks": list(dict.fromkeys(item.task for item in items)),
        "lengths": section.lengths,
        "depths": section.depths,
        "samples": section.samples,
        "seed": section.seed,
        "api": section.api,
    }
    longest = max(section.lengths) + max(item.max_tokens for item in items) + 512
    run = None
    for name, model, model_settings in models:

        def target_for(url: str, api_key: str | None, name: str = name) -> HTTPTarget:
            return HTTPTarget(
                url,
                name=name,
                api_key=api_key,
                api=section.api,
                concurrency=section.concurrency,
                timeout=section.timeout,
            )

        if name == "base" and config.base.url:
            target = target_for(config.base.url, config.base.api_key)
            target.prepare()
            check_base_server(target, settings)
            say(f"eval {name}: {config.base.url} (already running)")
            part = run_targets([target], items, eval_config, progress=progress)
        else:
            flags = lagkv_flags(model_settings) if model_settings else ["--no-lagkv"]
            if "--max-model-len" not in config.serve.args:
                flags += ["--max-model-len", str(longest)]
            log = out / "logs" / f"serve-{name.replace(' ', '-')}.log"
            say(
                f"serve {name}: lrsa serve {model} {' '.join(flags + config.serve.args)} "
                f"(log: {log})"
            )
            started = time.monotonic()
            with ManagedServer(
                model, [*flags, *config.serve.args], log, ready_timeout=config.serve.ready_timeout
            ) as server:
                say(f"serve {name}: ready on {server.url} in {time.monotonic() - started:.0f}s")
                target = target_for(server.url, server.api_key)
                part = run_targets([target], items, eval_config, progress=progress)
        run = part if run is None else run.merged(part)
    return run


def report_markdown(
    config: PipelineConfig,
    settings: Any,
    run: Any,
    training: dict[str, dict],
    plots: dict[str, Path],
    out: Path,
) -> str:
    from lrsa_serve.eval.report import appendix, markdown_table, target_lines
    from lrsa_serve.eval.runner import cells, lookup

    by_key = lookup(cells(run))
    names = [info.name for info in run.targets]
    trained = [name for name in names if name in training]
    tasks = list(dict.fromkeys(item.task for item in run.items))
    lengths = sorted({item.length for item in run.items})

    def score(name: str, task: str, length: int | None) -> str:
        cell = by_key.get((name, task, length))
        if cell is None:
            return "-"
        return f"{cell.score:.0%}" + (f" ({cell.failed} failed)" if cell.failed else "")

    def delta(name: str, task: str, length: int | None) -> str:
        new, old = by_key.get((name, task, length)), by_key.get(("base", task, length))
        if new is None or old is None:
            return "-"
        return f"{100 * (new.score - old.score):+.0f}"

    header = ["task", "length", *names, *(f"{n} vs base (points)" for n in trained)]
    rows = []
    per_task = [*lengths, None] if len(lengths) > 1 else lengths  # None: over all lengths
    for task in [*tasks, "mean"]:
        for length in [None] if task == "mean" else per_task:
            rows.append(
                [
                    task,
                    "all" if length is None else str(length),
                    *(score(n, task, length) for n in names),
                    *(delta(n, task, length) for n in trained),
                ]
            )
    train_rows = [
        [
            name,
            str(s.get("step", "-")),
            f"{s['loss']:.4f}" if "loss" in s else "-",
            f"{s['eval_exact_match']:.0%}" if "eval_exact_match" in s else "-",
            os.path.relpath(s["checkpoint"], out),
        ]
        for name, s in training.items()
    ]
    section = config.eval
    intro = (
        f"Base model `{run.targets[0].model}` ({config.model or 'the default model'}); every "
        f"model served by `lrsa serve` under LagKV {settings.short()}. Eval: API "
        f"`{section.api}`, tasks {', '.join(run.config['tasks'])}; lengths {section.lengths} "
        f"tokens; depths {section.depths}; {section.samples} sample(s) per cell, from the eval "
        "seed split (never trained on). Accuracy = mean partial-credit score; failed requests "
        "count as 0."
    )
    parts = [
        f"# Pipeline report: {config.name}",
        "",
        intro,
        "",
        "## Training",
        "",
        markdown_table(
            [
                "variant",
                "steps",
                "final loss",
                "held-out exact match (teacher forcing)",
                "checkpoint",
            ],
            train_rows,
        )
        if train_rows
        else "(none)",
        "",
        "## Accuracy",
        "",
        markdown_table(header, rows),
        "",
        "## Models",
        "",
        *[f"- {line}" for line in target_lines(run)],
    ]
    return "\n".join(parts + appendix(run, plots, out))


# ---- command ------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 2)[2]
    parser.add_argument("config", help="pipeline YAML (see below and examples/pipeline-*.yaml)")
    parser.add_argument("--out", help="output folder (overrides the config's out)")
    parser.add_argument("--base-url", help="evaluate the base model on this running server")
    parser.add_argument("--base-api-key", help="its API key")
    parser.add_argument(
        "--skip-train",
        action="store_true",
        help="reuse the checkpoints already in OUT/train/VARIANT",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.out:
        config.out = args.out
    if args.base_url:
        config.base = BaseSection(url=args.base_url, api_key=args.base_api_key)
    with stop_on_signals():
        return run_pipeline(config, skip_train=args.skip_train, progress=not args.no_progress)


def run_pipeline(config: PipelineConfig, *, skip_train: bool = False, progress: bool = True) -> int:
    from lrsa_serve.eval.report import to_json, write_outputs
    from lrsa_serve.eval.tasks import build_items, resolve_tasks
    from lrsa_serve.models import load_tokenizer, resolve_model

    out = Path(config.out)
    base_model = str(resolve_model(config.model))
    given = config.lagkv.model_dump()
    settings = LagKVConfig.resolve(base_model, **given) or LagKVConfig.build(**given)
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
        if skip_train:
            checkpoints[variant] = check_export(out / "train" / variant)
            say(f"train {variant}: skipped, reusing {checkpoints[variant]}")
        else:
            checkpoints[variant] = train_variant(config, base_model, settings, variant, out)
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
    run = evaluate_models(config, models, settings, items, out, progress)

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

    from lrsa_serve.eval.report import table_rows, text_table

    print(text_table(*table_rows(run)))
    say(f"done in {time.monotonic() - started:.0f}s: {out / 'report.md'}")
    return 1 if any(result.failed for result in run.results) else 0
