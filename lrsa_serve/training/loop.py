"""The LRSA post-training loop: explicit, one code path for 1 GPU, N GPUs (torchrun + FSDP2) and
CPU (tests).

One optimizer step = ``grad_accum x world_size`` micro-batches taken from ``BatchPlan`` (rank r
runs micro-batches r, r+W, ... of the step). The loss is the mean token cross-entropy over every
target token of the whole step: each micro-batch contributes ``sum(token losses) / step_targets``
(the count is known from the data, no communication), times the world size because FSDP
averages gradients over ranks. So one GPU with accumulation 2W and W GPUs with accumulation 2
take identical steps.

Faults: a non-finite loss or gradient norm stops the run with the step number (``NonFiniteLoss``)
before the optimizer step, so no checkpoint or export ever holds the broken weights.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lrsa_serve.errors import UserError
from lrsa_serve.models import load_tokenizer, resolve_model
from lrsa_serve.training import checkpoint as ckpt
from lrsa_serve.training import data as data_mod
from lrsa_serve.training import model as model_mod
from lrsa_serve.training.config import JobConfig, OptimConfig
from lrsa_serve.training.data import IGNORE_INDEX, TokenizedExample
from lrsa_serve.training.evaluate import EvalSums, evaluate_examples, target_logits, task_of


class NonFiniteLoss(UserError):
    """Loss or gradient norm became NaN/inf; the run stops before writing broken weights."""


# ---- process topology ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime() -> Runtime:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain ``python`` run is rank 0 of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(rank, world_size, device)


def _all_sum(values: list[float], runtime: Runtime) -> list[float]:
    if runtime.world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# ---- schedule and loss --------------------------------------------------------------------------
def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(
    model: torch.nn.Module, optim: OptimConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and norms; on CUDA the fused kernel (fewer launches
    than foreach's; it takes FSDP2's DTensor parameters too)."""
    decay = {"params": [], "weight_decay": optim.weight_decay}
    no_decay = {"params": [], "weight_decay": 0.0}
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "norm" in name else decay)["params"].append(param)
    fused = device.type == "cuda"
    return torch.optim.AdamW([decay, no_decay], lr=optim.lr, betas=optim.betas, fused=fused)


def autocast_for(device: torch.device, mixed_precision: str):
    enabled = device.type == "cuda" and mixed_precision == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast) -> torch.Tensor:
    """Summed token cross-entropy of a micro-batch (``data.collate``'s), on the device. Nothing
    here reads the device back: a read in the step would make the host wait for the GPU and
    lose its lead over it, and the rest of the step would then be launched at the host's pace
    (the LRSA layers' launches are the long part of it). Divide by a count known from the data
    (``target_count``)."""
    with autocast:
        logits, targets = target_logits(model, batch)
    return F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def target_count(labels: torch.Tensor) -> int:
    """Target tokens of a micro-batch's labels ``[B, T]`` (those ``loss_sum`` sums over). Reads
    the device where the labels are there: count before the step, not inside it."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


# ---- the trainer --------------------------------------------------------------------------------
class Trainer:
    """Owns model, optimizer, data and output folder of one job. ``run()`` trains to
    ``job.train.steps`` (resuming when asked), evaluates, checkpoints and exports."""

    def __init__(
        self,
        job: JobConfig,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        runtime: Runtime | None = None,
    ) -> None:
        self.job = job.validate()
        self.runtime = runtime or init_runtime()
        self.out_dir = Path(job.train.out_dir)
        self.autocast = autocast_for(self.runtime.device, job.train.mixed_precision)
        torch.manual_seed(job.train.seed)

        path = job.model.path
        if model is None or tokenizer is None:
            path = path or resolve_model(None)
        self.tokenizer = tokenizer or load_tokenizer(path)
        self.train_examples, self.train_stats = self._dataset("train")
        self.eval_examples, _ = self._dataset("eval")
        self.pad_id = data_mod.pad_token_id(self.tokenizer)
        self.plan = data_mod.BatchPlan(
            [len(e) for e in self.train_examples], job.data.batch_size, job.train.seed
        )
        self.per_step = job.train.grad_accum * self.runtime.world_size

        model = model or model_mod.load_model(path)
        model_mod.check_supported(model)
        model_mod.set_attention(
            model, job.model.attention, job.lagkv, job.model.lrsa_kernel,
            cuda_graphs=job.model.cuda_graphs,
        )  # fmt: skip
        model_mod.prepare_for_training(model, job.model.gradient_checkpointing)
        model.to(self.runtime.device)
        if job.model.compiles_on(self.runtime.device.type):
            model_mod.compile_layers(model)
        self.model = model_mod.parallelize(model, self.runtime.world_size)
        self.optimizer = build_optimizer(self.model, job.optim, self.runtime.device)
        o = job.optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, o.warmup_steps, job.train.steps, o.min_lr_ratio),
        )
        self.step = 0
        self.metrics_path = self.out_dir / "metrics.jsonl"

    def _dataset(self, split: str) -> tuple[list[TokenizedExample], data_mod.DataStats]:
        d = self.job.data
        if d.source == "synthetic" and (split == "train" or d.eval_source is None):
            count = d.synthetic_examples if split == "train" else d.synthetic_eval_examples
            drawn = (d.synthetic_min_tokens, d.synthetic_max_tokens, d.synthetic_tasks)
            examples = data_mod.synthetic_examples(self.tokenizer, count, split, *drawn)
        elif (path := d.source if split == "train" else d.eval_source) is not None:
            examples = data_mod.read_jsonl(path, self.tokenizer)
        else:
            return [], data_mod.DataStats()
        kept, stats = data_mod.apply_length_policy(examples, d.max_len, d.overlong)
        if split == "train" and not kept:
            raise UserError(
                f"no training example fits max-len {d.max_len} "
                f"({stats.skipped_overlong} skipped as over-long)"
            )
        return kept, stats

    def _batch(self, indices: list[int], examples: list[TokenizedExample]) -> dict:
        batch = data_mod.collate(
            [examples[i] for i in indices], self.pad_id, self.job.data.pad_multiple
        )
        return {name: tensor.to(self.runtime.device) for name, tensor in batch.items()}

    def log(self, record: dict[str, Any]) -> None:
        if self.runtime.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _trim_metrics(self, step: int) -> None:
        """On resume, drop what the killed run logged after its last checkpoint."""
        if not self.runtime.is_main or not self.metrics_path.is_file():
            return
        lines = self.metrics_path.read_text().splitlines()
        keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
        self.metrics_path.write_text("".join(line + "\n" for line in keep))

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "data_fingerprint": data_mod.fingerprint(self.train_examples),
            "micro_batches_per_step": self.per_step,
            "job": self.job.to_dict(),
        }

    def resume_if_asked(self) -> None:
        latest = ckpt.latest_checkpoint(self.out_dir)
        if latest is None:
            return
        if not self.job.train.resume:
            raise UserError(
                f"{self.out_dir} already holds checkpoints; pass --resume to continue that run "
                "or choose another --out"
            )
        state = ckpt.load_checkpoint(latest, self.model, self.optimizer)
        if state["data_fingerprint"] != data_mod.fingerprint(self.train_examples):
            raise UserError(f"cannot resume from {latest}: the training data changed")
        saved = state["job"]
        same_order = (
            state["micro_batches_per_step"] == self.per_step
            and saved["data"]["batch_size"] == self.job.data.batch_size
            and saved["train"]["seed"] == self.job.train.seed
        )
        if not same_order:
            raise UserError(
                f"cannot resume from {latest}: batch size, seed or grad-accum x GPUs changed, "
                "so the data order would differ"
            )
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self._trim_metrics(self.step)
        self.log({"event": "resume", "step": self.step, "checkpoint": str(latest)})

    def train_step(self) -> dict[str, float]:
        micro_batches = self.plan.step_micro_batches(self.step, self.per_step)
        step_targets = sum(
            self.train_examples[i].num_targets for indices in micro_batches for i in indices
        )
        mine = micro_batches[self.runtime.rank :: self.runtime.world_size]
        losses, tokens = [], 0
        for k, indices in enumerate(mine):
            batch = self._batch(indices, self.train_examples)
            if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2: sync on the last only
                self.model.set_requires_gradient_sync(k == len(mine) - 1)
            summed = loss_sum(self.model, batch, self.autocast)
            (summed * (self.runtime.world_size / step_targets)).backward()
            losses.append(summed.detach())
            tokens += sum(len(self.train_examples[i]) for i in indices)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.job.optim.grad_clip
        )
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        # The step's one read of the device, after its last backward and before the optimizer.
        loss_total, grad_norm = self._check_finite(torch.stack(losses).sum(), grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss_total, tokens = _all_sum([loss_total, float(tokens)], self.runtime)
        return {
            "loss": loss_total / step_targets,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": int(tokens),
            "target_tokens": step_targets,
        }

    def _check_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[float, float]:
        """The step's summed loss and gradient norm as numbers (one read of the device); a
        non-finite one on any rank stops the run, the loss named first (its gradients are
        non-finite too)."""
        values = torch.stack([loss.detach().float(), grad_norm.detach().float().to(loss.device)])
        loss_value, norm_value = values.tolist()
        flags = [float(not math.isfinite(v)) for v in (loss_value, norm_value)]
        bad = _all_sum(flags, self.runtime)
        what = "loss" if bad[0] else "gradient norm" if bad[1] else None
        if what is not None:
            self.log({"event": "non_finite", "step": self.step + 1, "what": what})
            raise NonFiniteLoss(
                f"non-finite {what} at step {self.step + 1}: stopped before the optimizer step; "
                f"no checkpoint was written for it (last good one: "
                f"{ckpt.latest_checkpoint(self.out_dir) or 'none'})"
            )
        return loss_value, norm_value

    def evaluate(self) -> dict[str, float]:
        """Loss and exact match on the held-out examples (``evaluate.py``), summed over ranks."""
        if not self.eval_examples:
            return {}
        sums = evaluate_examples(
            self.model,
            self.eval_examples,
            self.tokenizer,
            batch_size=self.job.data.batch_size,
            device=self.runtime.device,
            autocast=self.autocast,
            pad_multiple=self.job.data.pad_multiple,
            rank=self.runtime.rank,
            world_size=self.runtime.world_size,
        )
        tasks = sorted({task_of(example) for example in self.eval_examples})  # same on all ranks
        counts = [sums.examples[t] for t in tasks] + [sums.correct[t] for t in tasks]
        loss, targets, *counts = _all_sum([sums.loss, sums.targets, *counts], self.runtime)
        n = len(tasks)
        per_task = [dict(zip(tasks, part, strict=True)) for part in (counts[:n], counts[n:])]
        return EvalSums(loss, targets, *per_task).scores()

    def run(self) -> dict[str, Any]:
        from tqdm import tqdm

        self.resume_if_asked()
        t = self.job.train
        if self.step == 0:
            self.log({"event": "data", "step": 0, **asdict(self.train_stats)})
            if self.runtime.is_main and self.train_stats.skipped_overlong:
                print(
                    f"[lrsa train] skipped {self.train_stats.skipped_overlong} over-long examples "
                    f"(> {self.job.data.max_len} tokens)",
                    flush=True,
                )
        bar = tqdm(
            total=t.steps,
            initial=self.step,
            disable=not (self.runtime.is_main and t.progress),
            desc="lrsa train",
            unit="step",
        )
        last: dict[str, Any] = {}
        while self.step < t.steps:
            started = time.perf_counter()
            metrics = self.train_step()
            elapsed = time.perf_counter() - started
            metrics["tokens_per_s"] = metrics["tokens"] / elapsed
            metrics["step_s"] = elapsed
            last = {"step": self.step, **metrics}
            if self.step % t.log_every == 0 or self.step == t.steps:
                self.log(last)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            final = self.step == t.steps
            if self.eval_examples and (final or (t.eval_every and self.step % t.eval_every == 0)):
                scores = self.evaluate()
                self.log({"step": self.step, **scores})
                last.update(scores)
            if final or (t.save_every and self.step % t.save_every == 0):
                ckpt.save_checkpoint(
                    self.out_dir,
                    self.step,
                    self.model,
                    self.optimizer,
                    self._trainer_state(),
                    t.keep_checkpoints,
                    self.runtime.rank,
                )
        bar.close()
        lagkv = self.job.lagkv if self.job.model.attention == "lrsa" else None
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.job.train.export_dtype]
        ckpt.export_hf(self.model, self.tokenizer, self.out_dir, lagkv, dtype, self.runtime.rank)
        self.log({"event": "export", "step": self.step, "dir": str(self.out_dir)})
        return last
