"""``lrsa train``: post-train a causal LM with the LRSA mask and export a servable checkpoint.

Examples::

    lrsa train --data synthetic --out out/smol-lrsa --steps 200 --max-len 8192
    lrsa train ./my-model --data qa.jsonl --out out/my-lrsa --lag 1024 --ratio 0.25
    torchrun --nproc-per-node 2 -m lrsa_serve.cli train ./my-model --data qa.jsonl --out out/x

Flags override ``--config FILE.yaml`` (sections model/data/optim/train/lagkv, as in
``training/config.py``), which overrides the defaults. LagKV settings not given come from the
model's config.json ("lagkv") if it has them, else from ``LagKVConfig``'s defaults.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from lrsa_serve.config import LagKVConfig, add_lagkv_arguments, lagkv_overrides
from lrsa_serve.errors import UserError
from lrsa_serve.training.config import LRSA_KERNELS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # A flag's dest is the JobConfig field it sets (build_job copies those given). Defaults are
    # None so that a flag left out does not override --config; JobConfig holds the real defaults.
    p = parser.add_argument

    def renamed(flag: str, field: str, text: str) -> None:  # a flag named unlike its field
        p(flag, dest=field, metavar=flag[2:].upper().replace("-", "_"), help=text)

    def switch(flag: str, field: str, text: str) -> None:  # --no-X turns X off
        action = "store_false" if flag.startswith("--no-") else "store_true"
        p(flag, dest=field, action=action, default=None, help=text)

    p("model", nargs="?", default=None, help="local HF model folder (default: the default model)")
    p("--config", help="YAML job config; flags override it")
    renamed("--data", "source", "JSONL file (messages or prompt/completion) or 'synthetic'")
    renamed(
        "--eval-data", "eval_source", "held-out JSONL (synthetic data brings its own eval split)"
    )
    renamed("--out", "out_dir", "output folder: checkpoints/, metrics.jsonl and the exported model")
    add_lagkv_arguments(parser)
    p("--max-len", type=int, help="longest example in tokens (default 8192)")
    p("--overlong", choices=("skip", "truncate"), help="over-long examples (default skip)")
    p("--steps", type=int, help="optimizer steps (default 100)")
    p("--lr", type=float, help="peak learning rate (default 2e-5)")
    p("--min-lr-ratio", type=float, help="cosine floor as a fraction of --lr (default 0.1)")
    p("--warmup-steps", type=int, help="linear warm-up steps (default 10)")
    p("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    p("--grad-clip", type=float, help="gradient norm clip (default 1.0)")
    p("--batch-size", type=int, help="sequences per micro-batch and GPU (default 1)")
    p("--grad-accum", type=int, help="micro-batches per optimizer step and GPU (default 1)")
    p("--attention", choices=("lrsa", "dense"), help="lrsa (default) or dense SDPA baseline")
    p(
        "--lrsa-kernel",
        choices=LRSA_KERNELS,
        help="LRSA attention kernel (default auto: FlashAttention-4 from 8K tokens where "
        "installed, else FlashAttention-2 on CUDA; the exact reference on CPU); naming one pins "
        "it on any device",
    )
    switch("--no-grad-checkpointing", "gradient_checkpointing", "keep activations (more memory)")
    switch("--no-compile", "compile", "eager decoder layers (compiled on CUDA)")
    switch(
        "--no-cuda-graphs",
        "cuda_graphs",
        "run the LRSA attention's calls eagerly (on CUDA they are captured once per shape as "
        "CUDA graphs and replayed for every layer)",
    )
    p(
        "--dtype",
        dest="mixed_precision",
        choices=("bf16", "fp32"),
        help="autocast on CUDA (default bf16)",
    )
    p("--export-dtype", choices=("float32", "bfloat16"), help="exported weights (default float32)")
    p("--eval-every", type=int, help="steps between evaluations (0: at the end only)")
    p("--save-every", type=int, help="steps between checkpoints (0: at the end only)")
    p("--keep-checkpoints", type=int, help="checkpoints kept (default 2)")
    p("--log-every", type=int, help="steps between metrics lines (default 1)")
    switch("--resume", "resume", "continue from the last checkpoint in --out")
    p("--seed", type=int, help="data order seed (default 0)")
    p(
        "--synthetic-examples",
        type=int,
        help="synthetic training examples (default: as many as the run uses, "
        "steps x grad-accum x batch-size x GPUs)",
    )
    p("--synthetic-eval-examples", type=int, help="synthetic held-out examples (default 64)")
    p(
        "--synthetic-min-tokens",
        type=int,
        help="shortest synthetic prompt (default 2048, at most half of --synthetic-max-tokens)",
    )
    p(
        "--synthetic-max-tokens",
        type=int,
        help="longest synthetic example, template and answer included "
        "(default 8000 or --max-len if smaller)",
    )
    p(
        "--synthetic-tasks",
        type=_names,
        help="comma-separated tasks from lrsa_serve.synthetic_tasks.TASKS",
    )
    switch("--no-progress", "progress", "no tqdm bar")


def _names(text: str) -> tuple[str, ...] | None:
    return tuple(name.strip() for name in text.split(",")) if text else None


def build_job(args: argparse.Namespace):
    """JobConfig from defaults < --config < flags, validated."""
    from lrsa_serve.models import resolve_model
    from lrsa_serve.training.config import JobConfig

    try:
        job = JobConfig.from_yaml(args.config) if args.config else JobConfig()
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"--config {args.config}: {e}") from None
    for section in (job.model, job.data, job.optim, job.train):
        for field in fields(section):
            if (value := getattr(args, field.name, None)) is not None:
                setattr(section, field.name, value)
    job.model.path = resolve_model(args.model or job.model.path)
    # Settings: flags > --config's lagkv section > the model's config.json > defaults.
    flags = {name: value for name, value in lagkv_overrides(args).items() if value is not None}
    from_config = job.lagkv.model_dump() if args.config else {}
    job.lagkv = LagKVConfig.for_model(job.model.path, **(from_config | flags))
    if job.train.resume and job.data.synthetic_examples is None:
        # The derived count follows --steps; a run resumed with more steps keeps the examples
        # (hence the data order) it started with: the newest checkpoint's job says how many.
        from lrsa_serve.training import checkpoint as ckpt

        if (latest := ckpt.latest_checkpoint(Path(job.train.out_dir))) is not None:
            saved = json.loads((latest / ckpt.TRAINER_STATE).read_text())["job"]
            job.data.synthetic_examples = saved["data"]["synthetic_examples"]
    try:
        return job.validate()
    except ValueError as e:
        raise UserError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    job = build_job(args)
    from lrsa_serve import lagkv
    from lrsa_serve.config import LagKVConfigError
    from lrsa_serve.training.loop import Trainer

    trainer = Trainer(job)
    if trainer.runtime.is_main:
        # The engine frees whole KV blocks (lrsa_serve.engine.api.default_block_size).
        for engine, block in (("GPU", 16), ("CPU", 32)):
            try:
                job.lagkv.check_block_size(block)
            except LagKVConfigError as e:
                print(f"[lrsa train] warning: the {engine} engine cannot serve this: {e}")
                break
        # Below S + 2L tokens no query has a compressed partition behind it.
        reach = lagkv.partition_start(2, job.lagkv.rule)
        if job.model.attention == "lrsa" and trainer.train_stats.longest <= reach:
            print(
                f"[lrsa train] warning: no training example is longer than sink + 2 x lag = "
                f"{reach} tokens, so the LRSA mask is plain causal attention here; lower --lag "
                "or raise --max-len"
            )
        print(
            f"[lrsa train] {job.model.path} attention={job.model.attention} "
            f"{job.lagkv.short()} examples={len(trainer.train_examples)} "
            f"device={trainer.runtime.device} world={trainer.runtime.world_size}",
            flush=True,
        )
    last = trainer.run()
    if trainer.runtime.is_main:
        summary = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()
        )
        print(f"[lrsa train] done: {summary}; exported to {job.train.out_dir}", flush=True)
    return 0
