"""``lrsa pipeline --resume``'s bookkeeping: which trainings are reused or resumed, and which
models' kept answers still apply (the end-to-end run: tests/test_pipeline.py)."""

from __future__ import annotations

import os

import pytest

from lrsa_serve.eval.runner import Answer, EvalRun, TargetInfo, grade
from lrsa_serve.eval.tasks import build_items, resolve_tasks
from lrsa_serve.pipeline.resume import EvalParts, eval_key, record_training, training_state

COMMAND = ["train", "base", "--out", "o", "--steps", "2"]


def test_training_state_follows_what_the_run_left(tmp_path):
    folder = tmp_path / "lrsa"
    assert training_state(folder, COMMAND) == "fresh"  # nothing there
    record_training(folder, COMMAND)
    assert training_state(folder, COMMAND) == "fresh"  # started, nothing saved yet
    partial = folder / "checkpoints" / "step_000001"
    partial.mkdir(parents=True)
    assert training_state(folder, COMMAND) == "fresh"  # a half-written checkpoint is no start
    (partial / "trainer.json").write_text("{}")
    assert training_state(folder, COMMAND) == "resume"
    assert training_state(folder, [*COMMAND[:-1], "4"]) == "fresh"  # the config changed
    (folder / "metrics.jsonl").write_text('{"step": 2, "loss": 1.0}\n')
    assert training_state(folder, COMMAND) == "resume"
    with (folder / "metrics.jsonl").open("a") as f:
        f.write('{"event": "export", "step": 2, "dir": "o"}\n')
    assert training_state(folder, COMMAND) == "done"
    (folder / "pipeline-train.json").write_text("not json")
    assert training_state(folder, COMMAND) == "fresh"


@pytest.fixture
def items(tokenizer):
    return build_items(tokenizer, resolve_tasks(["passkey"]), [300, 600], [0.5], 1)


def answered(items, name: str, error: str | None = None) -> EvalRun:
    info = TargetInfo(name, "http", "m", {"sink": 32, "lag": 128, "ratio": 0.25}, url="http://x")
    info.notes.append("served by `lrsa serve m`")
    results = [grade(name, item, Answer(" ".join(item.expected), error, 0.5)) for item in items]
    return EvalRun({"tasks": ["passkey"]}, [info], list(items), results)


def test_kept_answers_are_reused_only_where_they_still_apply(tmp_path, items):
    parts = EvalParts(tmp_path / "parts")
    config = {"tasks": ["passkey"]}
    key = eval_key("m", ["--sink", "32"], config, items)
    run = answered(items, "base uncompressed")
    parts.save(key, run)
    assert parts.path("base uncompressed").name == "base-uncompressed.json"
    loaded = parts.load("base uncompressed", key, config, items)
    assert loaded is not None
    assert loaded.targets == run.targets
    assert [r.score for r in loaded.results] == [r.score for r in run.results] == [1.0, 1.0]
    assert [r.answer for r in loaded.results] == [r.answer for r in run.results]
    # anything the answers depend on changed: asked again
    assert parts.load("base uncompressed", "other", config, items) is None
    assert eval_key("m", ["--sink", "16"], config, items) != key
    assert eval_key("m", ["--sink", "32"], {"tasks": ["niah"]}, items) != key
    assert eval_key("m", ["--sink", "32"], config, items[:1]) != key
    assert parts.load("base uncompressed", key, config, items[:1]) is None
    assert parts.load("lrsa", key, config, items) is None  # never kept
    # a run with failed requests is never reused
    parts.save(key, answered(items, "lrsa", error="HTTP 503: busy"))
    assert parts.load("lrsa", key, config, items) is None
    # a damaged file is asked again, not an error
    parts.path("base uncompressed").write_text("{")
    assert parts.load("base uncompressed", key, config, items) is None


def test_a_retrained_model_is_asked_again(tmp_path, items):
    model = tmp_path / "export"
    model.mkdir()
    (model / "config.json").write_text("{}")
    weights = model / "model.safetensors"
    weights.write_bytes(b"a")
    key = eval_key(str(model), ["--sink", "32"], {}, items)
    assert eval_key(str(model), ["--sink", "32"], {}, items) == key
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert eval_key(str(model), ["--sink", "32"], {}, items) != key
