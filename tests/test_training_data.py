"""Training data: formats and loss masks, errors that name file and line, the over-long
policy, and a batch order that is a pure function of (seed, micro-batch index)."""

from __future__ import annotations

import json

import pytest

from lrsa_serve.cli import main as lrsa_main
from lrsa_serve.training import data
from lrsa_serve.training.data import IGNORE_INDEX, DataError


@pytest.fixture(scope="module")
def tokenizer():
    from benchmarks.random_models import tiny_tokenizer

    return tiny_tokenizer()


def write_jsonl(path, lines):
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    )
    return path


def targets_text(example, tokenizer):
    return tokenizer.decode(
        [t for t, y in zip(example.input_ids, example.labels, strict=True) if y != IGNORE_INDEX]
    )


def test_messages_loss_on_assistant_turns_only(tokenizer):
    record = {
        "messages": [
            {"role": "user", "content": "What is the pass key?"},
            {"role": "assistant", "content": "12345"},
            {"role": "user", "content": "Again?"},
            {"role": "assistant", "content": "67890"},
        ]
    }
    example = data.encode_record(record, tokenizer, "x:1")
    assert targets_text(example, tokenizer) == "12345<|im_end|>67890<|im_end|>"
    assert tokenizer.decode(example.input_ids).startswith("<|im_start|>user\nWhat is the pass key?")


def test_prompt_completion_loss_on_completion_and_eos(tokenizer):
    example = data.encode_record(
        {"prompt": "The pass key is", "completion": " 4242"}, tokenizer, "x:1"
    )
    assert targets_text(example, tokenizer) == " 4242" + tokenizer.eos_token
    assert example.labels[: len(tokenizer("The pass key is")["input_ids"])] == [IGNORE_INDEX] * len(
        tokenizer("The pass key is")["input_ids"]
    )


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"prompt": "a", "completion": ', "malformed JSON"),
        ({"prompt": "a"}, "missing field 'completion'"),
        ({"completion": "a"}, "missing field 'prompt'"),
        ({"text": "a"}, "missing field"),
        ({"prompt": "a", "completion": "  "}, "empty completion"),
        ({"prompt": "a", "completion": 3}, "must be a string"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
            "empty assistant",
        ),
        ({"messages": [{"role": "user"}]}, "missing field 'content'"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, tokenizer, line, message):
    good = {"prompt": "a", "completion": "b"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, "", good, line])
    with pytest.raises(DataError) as info:
        data.read_jsonl(path, tokenizer)
    assert f"{path}:4:" in str(info.value) and message in str(info.value)


def test_cli_reports_bad_data_in_one_line(tmp_path, capsys):
    from benchmarks.random_models import save_tiny_model

    model = save_tiny_model(tmp_path / "m")
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, "{oops"])
    code = lrsa_main(["train", str(model), "--data", str(path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("lrsa train: error: ") and f"{path}:2: malformed JSON" in err[-1]


def test_overlong_policy_is_counted(tokenizer):
    short = data.encode_record({"prompt": "a b", "completion": "c"}, tokenizer, "x:1")
    long = data.encode_record({"prompt": "a b " * 50, "completion": "c"}, tokenizer, "x:2")
    kept, stats = data.apply_length_policy([short, long, long], max_len=20, policy="skip")
    assert kept == [short] and stats.skipped_overlong == 2 and stats.examples == 1
    # truncation keeps the start; these lose their completion, so they are skipped too
    kept, stats = data.apply_length_policy([short, long], max_len=20, policy="truncate")
    assert kept == [short] and stats.skipped_overlong == 1 and stats.truncated_overlong == 0
    qa = data.encode_record({"prompt": "a", "completion": "b c " * 30}, tokenizer, "x:3")
    kept, stats = data.apply_length_policy([qa], max_len=20, policy="truncate")
    assert len(kept[0]) == 20 and kept[0].num_targets > 0 and stats.truncated_overlong == 1


def test_synthetic_train_and_eval_differ_and_are_deterministic(tokenizer):
    args = (tokenizer, 6)
    kwargs = dict(min_tokens=80, max_tokens=200, tasks=("passkey", "kv_lookup"))
    train = data.synthetic_examples(*args, "train", **kwargs)
    again = data.synthetic_examples(*args, "train", **kwargs)
    held_out = data.synthetic_examples(*args, "eval", **kwargs)
    assert train == again
    assert not {e.source for e in train} & {e.source for e in held_out}
    assert all(targets_text(e, tokenizer) == e.answer + "<|im_end|>" for e in train)


def test_batch_plan_is_a_function_of_seed_and_index():
    lengths = [5, 90, 12, 40, 7, 66, 31, 8, 100, 3, 55]
    plan = data.BatchPlan(lengths, batch_size=2, seed=3, pool_batches=2)
    first = [plan.micro_batch(k) for k in range(20)]  # crosses epochs
    fresh = data.BatchPlan(lengths, batch_size=2, seed=3, pool_batches=2)
    assert [fresh.micro_batch(k) for k in reversed(range(20))] == first[::-1]
    epoch = [i for k in range(plan.batches_per_epoch) for i in first[k]]
    assert sorted(epoch) == list(range(len(lengths)))  # each example once per epoch
    assert (
        first[: plan.batches_per_epoch]
        != first[plan.batches_per_epoch : 2 * plan.batches_per_epoch]
    )
    # 1 rank x accumulation 4 and 2 ranks x accumulation 2 see the same step
    assert plan.step_micro_batches(3, 4) == first[12:16]
    other_seed = data.BatchPlan(lengths, batch_size=2, seed=4, pool_batches=2)
    assert [other_seed.micro_batch(k) for k in range(6)] != first[:6]


def test_collate_right_pads(tokenizer):
    a = data.TokenizedExample([5, 6, 7], [IGNORE_INDEX, 6, 7], "a")
    b = data.TokenizedExample([8], [8], "b")
    batch = data.collate([a, b], pad_id=0, pad_multiple=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 6, 7, IGNORE_INDEX],
        [8] + [IGNORE_INDEX] * 3,
    ]
    # where the LM head runs: positions whose next token is a target in some row
    assert batch["positions"].tolist() == [0, 1]


def test_config_file_and_flags(tmp_path):
    """YAML config < flags; LagKV flags override the file; unknown keys are one-line errors."""
    import argparse
    from pathlib import Path

    from benchmarks.random_models import save_tiny_model
    from lrsa_serve.errors import UserError
    from lrsa_serve.training.cli import add_arguments, build_job

    model = save_tiny_model(tmp_path / "m")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    example = Path(__file__).parents[1] / "examples" / "train-smollm2-synthetic.yaml"
    args = parser.parse_args([str(model), "--config", str(example), "--steps", "7", "--lag", "128"])
    job = build_job(args)
    assert job.train.steps == 7 and job.train.grad_accum == 4 and job.data.batch_size == 2
    assert (job.lagkv.sink, job.lagkv.lag, job.lagkv.ratio) == (32, 128, 0.25)
    assert job.model.path == str(model) and job.model.lrsa_kernel == "auto"
    job = build_job(
        parser.parse_args([str(model), "--config", str(example), "--lrsa-kernel", "math"])
    )
    assert job.model.lrsa_kernel == "math" and job.model.cuda_graphs
    job = build_job(parser.parse_args([str(model), "--config", str(example), "--no-cuda-graphs"]))
    assert job.model.cuda_graphs is False
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(UserError, match="unknown keys in train"):
        build_job(parser.parse_args([str(model), "--config", str(bad)]))
    bad.write_text("model:\n  lrsa_kernel: fast\n")
    with pytest.raises(UserError, match="lrsa kernel must be one of"):
        build_job(parser.parse_args([str(model), "--config", str(bad)]))


def test_synthetic_defaults_follow_max_len_and_the_run(tmp_path):
    """Left unset, the synthetic data fits --max-len and holds as many examples as the run
    takes (steps x grad-accum x batch size); it used to be 2,000 examples of 2,048-8,000 tokens
    whatever --max-len said, so at 512 every one was skipped and the run stopped."""
    import argparse

    import torch

    from benchmarks.random_models import random_model, save_tiny_model, tiny_config, tiny_tokenizer
    from lrsa_serve.training import loop
    from lrsa_serve.training.cli import add_arguments, build_job

    model = save_tiny_model(tmp_path / "m")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = [str(model), "--data", "synthetic", "--max-len", "512", "--out", str(tmp_path / "o")]
    run = ["--steps", "3", "--batch-size", "2", "--grad-accum", "2", "--lag", "64"]
    job = build_job(parser.parse_args([*flags, *run]))
    derived = (job.data.synthetic_examples, job.data.synthetic_min_tokens)
    assert (*derived, job.data.synthetic_max_tokens) == (12, 256, 512)
    tokenizer = tiny_tokenizer()
    trainer = loop.Trainer(
        job,
        model=random_model(tiny_config("llama", vocab_size=len(tokenizer))),
        tokenizer=tokenizer,
        runtime=loop.Runtime(0, 1, torch.device("cpu")),
    )
    assert len(trainer.train_examples) == 12 and trainer.train_stats.skipped_overlong == 0
    assert max(len(e) for e in trainer.train_examples + trainer.eval_examples) <= 512
    assert len(trainer.eval_examples) == job.data.synthetic_eval_examples
    # explicit flags still win; the long defaults are unchanged at the default max-len
    job = build_job(parser.parse_args([*flags, "--synthetic-examples", "5",
                                       "--synthetic-max-tokens", "400"]))  # fmt: skip
    assert (job.data.synthetic_examples, job.data.synthetic_max_tokens) == (5, 400)
    assert job.data.synthetic_min_tokens == 200
    job = build_job(parser.parse_args([str(model), "--steps", "50"]))
    derived = (job.data.synthetic_examples, job.data.synthetic_min_tokens)
    assert (*derived, job.data.synthetic_max_tokens) == (50, 2048, 8000)


def test_synthetic_examples_never_exceed_max_tokens():
    """The drawn length is the prompt's; template and answer come on top, so over-long examples
    are drawn again shorter. The default model's tokenizer is not needed: the tiny one's
    template overhead is larger."""
    from benchmarks.random_models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tasks = ("passkey", "multikey_needle", "kv_lookup", "variable_tracking")
    made = data.synthetic_examples(tokenizer, 40, "train", 300, 480, tasks)
    assert max(len(e) for e in made) <= 480
    # the cut keeps the example: same source (seed, task) and answer as the uncut draw
    uncut = [data.synthetic_example(tokenizer, i, "train", 300, 480, tasks) for i in range(40)]
    assert [e.answer for e in made] == [u.answer for u in uncut]
    assert [e.source.split(":")[2:] for e in made] == [[str(u.seed), u.task] for u in uncut]
