"""The training loop on a tiny random model (CPU, LRSA's dense masked path with compression
active): it learns, it exports a loadable checkpoint with its settings, it resumes with the same
data order, and it stops on a non-finite loss without writing broken weights."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.random_models import random_model, tiny_config, tiny_tokenizer
from lrsa_serve.config import LagKVConfig
from lrsa_serve.training import loop
from lrsa_serve.training.config import JobConfig

LAGKV = LagKVConfig(sink=4, lag=16, ratio=0.25)  # ~150-token examples: several compressed parts


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def make_job(out_dir, **train) -> JobConfig:
    job = JobConfig(lagkv=LAGKV)
    job.data.max_len = 400
    job.data.batch_size = 2
    job.data.synthetic_examples = 8
    job.data.synthetic_eval_examples = 4
    job.data.synthetic_min_tokens = 100
    job.data.synthetic_max_tokens = 220
    job.data.synthetic_tasks = ("passkey", "kv_lookup")
    job.model.gradient_checkpointing = True
    job.optim.lr = 3e-3
    job.optim.warmup_steps = 1
    job.train.out_dir = str(out_dir)
    job.train.eval_every = 0
    job.train.save_every = 0
    job.train.progress = False
    for key, value in train.items():
        setattr(job.train, key, value)
    return job


def make_trainer(job, tokenizer, kind="llama", seed=0):
    model = random_model(tiny_config(kind, vocab_size=len(tokenizer)), seed=seed)
    return loop.Trainer(job, model=model, tokenizer=tokenizer)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_steps_reduce_loss_on_a_fixed_batch(tmp_path, tokenizer, kind):
    trainer = make_trainer(make_job(tmp_path, steps=1), tokenizer, kind)
    assert trainer.model.config._attn_implementation == "lrsa"
    batch = trainer._batch([0, 1], trainer.train_examples)
    assert batch["input_ids"].shape[1] > LAGKV.sink + 3 * LAGKV.lag  # compression is active

    count = loop.target_count(batch["labels"])

    @torch.no_grad()
    def loss() -> float:
        return float(loop.loss_sum(trainer.model, batch, trainer.autocast)) / count

    before = loss()
    for _ in range(12):
        trainer.optimizer.zero_grad()
        (loop.loss_sum(trainer.model, batch, trainer.autocast) / count).backward()
        trainer.optimizer.step()
    assert loss() < 0.6 * before


def test_the_jobs_lrsa_kernel_picks_the_attention_path(tmp_path, tokenizer, monkeypatch):
    """``model.lrsa_kernel`` (``--lrsa-kernel``) reaches the attention: on CPU ``auto`` is the
    dense masked reference, ``math`` the varlen items through ``lrsa::varlen``; same loss."""
    from lrsa_serve.training.attention import dispatch, op

    kernels = []
    real = op.lrsa_varlen_op

    def recording(*args, kernel="auto", **kwargs):
        kernels.append(kernel)
        return real(*args, kernel=kernel, **kwargs)

    monkeypatch.setattr(op, "lrsa_varlen_op", recording)
    losses = {}
    try:
        for kernel in ("auto", "math"):
            job = make_job(tmp_path / kernel, steps=1)
            job.model.lrsa_kernel = kernel
            trainer = make_trainer(job, tokenizer)
            batch = trainer._batch([0, 1], trainer.train_examples)
            kernels.clear()
            with torch.no_grad():
                total = loop.loss_sum(trainer.model, batch, trainer.autocast)
            losses[kernel] = float(total) / loop.target_count(batch["labels"])
            layers = trainer.model.config.num_hidden_layers
            assert kernels == ([] if kernel == "auto" else ["math"] * layers)
    finally:
        dispatch.set_kernel("auto")
    assert losses["math"] == pytest.approx(losses["auto"], rel=1e-5)


def test_the_jobs_cuda_graphs_switch_reaches_the_op(tmp_path, tokenizer):
    """``model.cuda_graphs`` (``--no-cuda-graphs``) sets whether the op's calls may be captured:
    off, ``op.GRAPHS`` keeps none (every call eager); on again, the default."""
    from lrsa_serve.training.attention import dispatch, graphs, op

    try:
        for on in (False, True):
            job = make_job(tmp_path / str(on), steps=1)
            job.model.cuda_graphs = on
            make_trainer(job, tokenizer)
            assert op.GRAPHS.max_graphs == (graphs.MAX_GRAPHS if on else 0)
    finally:
        dispatch.set_cuda_graphs(True)


def test_export_reloads_with_weights_and_settings(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = make_trainer(make_job(tmp_path, steps=2), tokenizer)
    trainer.run()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    trained = trainer.model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0)
    assert LagKVConfig.from_checkpoint(tmp_path) == LAGKV
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["use_cache"] is True and "_attn_implementation" not in config
    assert AutoTokenizer.from_pretrained(tmp_path).encode("pass key 1") == tokenizer.encode(
        "pass key 1"
    )
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["event"] == "data" and metrics[0]["skipped_overlong"] == 0
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    assert "eval_exact_match" in metrics[-2]


def test_resume_continues_with_the_same_data_order(tmp_path, tokenizer, monkeypatch):
    seen: dict[str, list] = {"full": [], "killed": [], "resumed": []}
    original = loop.data_mod.BatchPlan.step_micro_batches
    current = {"run": "full"}

    def spy(self, step, per_step):
        batches = original(self, step, per_step)
        seen[current["run"]].append((step, batches))
        return batches

    monkeypatch.setattr(loop.data_mod.BatchPlan, "step_micro_batches", spy)
    full = make_trainer(make_job(tmp_path / "full", steps=5, grad_accum=2), tokenizer)
    full.run()

    current["run"] = "killed"
    killed = make_trainer(
        make_job(tmp_path / "run", steps=5, grad_accum=2, save_every=2), tokenizer
    )
    step_once = killed.train_step

    def die_after_three():
        if killed.step == 3:
            raise KeyboardInterrupt  # the run dies after step 3; its last checkpoint is step 2
        return step_once()

    killed.train_step = die_after_three
    with pytest.raises(KeyboardInterrupt):
        killed.run()

    current["run"] = "resumed"
    with pytest.raises(loop.UserError, match="--resume"):
        make_trainer(make_job(tmp_path / "run", steps=5, grad_accum=2), tokenizer).run()
    # a different initialisation proves the weights come from the checkpoint
    resumed = make_trainer(
        make_job(tmp_path / "run", steps=5, grad_accum=2, resume=True), tokenizer, seed=7
    )
    resumed.run()
    assert [s for s, _ in seen["resumed"]] == [2, 3, 4]
    assert seen["resumed"] == seen["full"][2:]
    for name, tensor in resumed.model.state_dict().items():
        torch.testing.assert_close(tensor, full.model.state_dict()[name], rtol=1e-6, atol=1e-7)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5]  # the killed run's step 3 was dropped, then redone


def test_non_finite_loss_stops_with_the_step(tmp_path, tokenizer, monkeypatch):
    calls = {"n": 0}
    real_loss_sum = loop.loss_sum

    def poisoned(model, batch, autocast):
        total = real_loss_sum(model, batch, autocast)
        calls["n"] += 1
        return total * float("nan") if calls["n"] == 3 else total

    monkeypatch.setattr(loop, "loss_sum", poisoned)
    trainer = make_trainer(make_job(tmp_path, steps=4, save_every=2), tokenizer)
    with pytest.raises(loop.NonFiniteLoss, match="non-finite loss at step 3"):
        trainer.run()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_000002"]  # nothing after the last good step
    assert not (tmp_path / "model.safetensors").exists()  # no export of broken weights
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last == {"event": "non_finite", "step": 3, "what": "loss"}


def test_compiled_layers_train_as_eager(tmp_path, tokenizer):
    """``model.compile`` (default on CUDA) compiles every decoder layer, the LRSA attention
    running eagerly inside; loss and gradients equal the eager model's, through checkpointing,
    on two lengths (the second one dynamic)."""
    grads = {}
    for compiled in (False, True):
        job = make_job(tmp_path / str(compiled), steps=1)
        job.model.compile = compiled
        trainer = make_trainer(job, tokenizer, "qwen2")
        modules = [m for m in trainer.model.modules() if m._compiled_call_impl is not None]
        layers = trainer.model.config.num_hidden_layers
        assert len(modules) == (layers if compiled else 0)
        losses = []
        for rows in ([0, 1], [2, 3]):
            trainer.model.zero_grad()
            batch = trainer._batch(rows, trainer.train_examples)
            loss = loop.loss_sum(trainer.model, batch, trainer.autocast)
            loss = loss / loop.target_count(batch["labels"])
            loss.backward()
            losses.append(float(loss))
        grads[compiled] = (losses, [p.grad.clone() for p in trainer.model.parameters()])
    # float32 on CPU; on a GPU the trainer runs bf16 autocast, where fusion changes rounding
    exact = trainer.runtime.device.type == "cpu"
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-5 if exact else 2e-3)
    for got, want in zip(grads[True][1], grads[False][1], strict=True):
        assert float((got - want).norm()) <= (1e-4 if exact else 3e-2) * float(want.norm()) + 1e-8
    assert JobConfig().model.compiles_on("cuda") and not JobConfig().model.compiles_on("cpu")


def test_cli_trains_the_default_model_at_max_len_512(tmp_path, default_model, capsys):
    """The README's CPU example, with 2 held-out examples instead of 64: with no synthetic
    lengths given the data fits --max-len, one example per step is built, and the run writes
    its checkpoint and a servable export (S, L, keep multiples of the CPU block 32)."""
    from lrsa_serve.cli import main as lrsa_main

    out = tmp_path / "t512"
    code = lrsa_main(["train", default_model, "--data", "synthetic", "--max-len", "512",
                      "--steps", "2", "--lag", "128", "--synthetic-eval-examples", "2",
                      "--out", str(out), "--no-progress"])  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert " examples=2 " in stdout and "warning" not in stdout
    assert (out / "checkpoints" / "step_000002" / "trainer.json").is_file()
    assert LagKVConfig.from_checkpoint(out) == LagKVConfig(sink=32, lag=128, ratio=0.25)
    LagKVConfig.from_checkpoint(out).check_block_size(32)
    data_line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert data_line["examples"] == 2 and data_line["skipped_overlong"] == 0
    assert data_line["longest"] <= 512


def test_non_finite_gradient_norm_stops_with_the_step(tmp_path, tokenizer, monkeypatch):
    real_clip = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def exploding(parameters, max_norm):
        norm = real_clip(parameters, max_norm)
        calls["n"] += 1
        return norm * float("inf") if calls["n"] == 2 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", exploding)
    trainer = make_trainer(make_job(tmp_path, steps=3), tokenizer)
    with pytest.raises(loop.NonFiniteLoss, match="non-finite gradient norm at step 2"):
        trainer.run()
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last == {"event": "non_finite", "step": 2, "what": "gradient norm"}
