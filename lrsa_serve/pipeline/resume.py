"""What an interrupted pipeline run left that ``lrsa pipeline --resume`` reuses.

- A variant's training: its ``lrsa train`` command is recorded in
  ``OUT/train/VARIANT/pipeline-train.json`` before it starts. Resumed with the same command, a
  training that exported (the trainer logged its ``export`` event) is reused, and one that left
  checkpoints continues from the latest (``lrsa train --resume``). Any other command, or no
  record, trains afresh.
- A model's evaluation: each model's answers go to ``OUT/eval/parts/NAME.json`` as soon as it is
  evaluated, under a key of everything they depend on (the model's files, how it is served, the
  eval settings, the items). Resumed, a part with the same key and no failed request is reused
  instead of serving and asking that model again.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from lrsa_serve.eval.runner import Answer, EvalRun, TargetInfo, grade
from lrsa_serve.eval.tasks import EvalItem

TRAIN_RECORD = "pipeline-train.json"
TrainingState = Literal["fresh", "resume", "done"]


def record_training(folder: Path, command: Sequence[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TRAIN_RECORD).write_text(json.dumps(list(command)) + "\n")


def training_state(folder: Path, command: Sequence[str]) -> TrainingState:
    """``done``: this command trained and exported here; ``resume``: it left checkpoints;
    ``fresh``: anything else (another command, no record, nothing saved yet)."""
    from lrsa_serve.training.checkpoint import latest_checkpoint

    try:
        recorded = json.loads((folder / TRAIN_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return "fresh"
    if recorded != list(command):
        return "fresh"
    if _exported(folder):
        return "done"
    return "resume" if latest_checkpoint(folder) is not None else "fresh"


def _exported(folder: Path) -> bool:
    try:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        try:
            if json.loads(line).get("event") == "export":
                return True
        except (json.JSONDecodeError, AttributeError):
            continue
    return False


def _files(model: str) -> list[list[Any]]:
    """Name, size and modification time of a local model's weights and config: a retrained
    export changes them."""
    folder = Path(model)
    if not folder.is_dir():
        return []
    files = sorted([*folder.glob("*.safetensors"), *folder.glob("config.json")])
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def eval_key(
    model: str, served: Sequence[str] | str, config: dict[str, Any], items: Sequence[EvalItem]
) -> str:
    """What a model's answers depend on: ``served`` is its ``lrsa serve`` flags, or the URL of
    the server it runs on."""
    digest = hashlib.sha256()
    head = {"model": model, "files": _files(model), "served": served, "config": config}
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    for item in items:
        digest.update(repr(item).encode())
    return digest.hexdigest()


class EvalParts:
    """Each model's evaluated answers, one file per model under ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, name: str) -> Path:
        return self.folder / (re.sub(r"[^A-Za-z0-9_.-]+", "-", name) + ".json")

    def save(self, key: str, run: EvalRun) -> None:
        (info,) = run.targets
        answers = [
            {"id": r.item.id, "text": r.answer.text, "error": r.answer.error,
             "seconds": r.answer.seconds}
            for r in run.results
        ]  # fmt: skip
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(info.name)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps({"key": key, "info": asdict(info), "answers": answers}))
        partial.replace(path)  # a run killed mid-write leaves no half part

    def load(
        self, name: str, key: str, config: dict[str, Any], items: Sequence[EvalItem]
    ) -> EvalRun | None:
        """The saved run of model ``name`` if its key matches and none of its requests failed."""
        try:
            saved = json.loads(self.path(name).read_text())
            if saved["key"] != key:
                return None
            info = TargetInfo(**saved["info"])
            answers = [Answer(a["text"], a["error"], a["seconds"]) for a in saved["answers"]]
            ids = [a["id"] for a in saved["answers"]]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return None
        if info.name != name or ids != [item.id for item in items]:
            return None
        if any(answer.error is not None for answer in answers):
            return None
        results = [grade(name, item, a) for item, a in zip(items, answers, strict=True)]
        return EvalRun(dict(config), [info], list(items), results)
