"""The LRSA claim in miniature: post-train the same model twice on synthetic long-context QA,
once with dense attention and once with LRSA (same data, steps, seed), then score both on the
held-out split uncompressed (SDPA) and under LagKV (the reference attention, same settings).

Scores are exact match under teacher forcing (= greedy decoding starts with the answer), float32,
per task and overall. The untrained model is scored too when time allows.

    python -m benchmarks.lrsa_vs_dense --model ~/.cache/lrsa-serve/models/SmolLM2-135M-Instruct
    python -m benchmarks.lrsa_vs_dense --gguf DIR/model.gguf --tokenizer DIR       # from a GGUF
    python -m benchmarks.lrsa_vs_dense --smoke                                       # CPU check

``--balanced-eval`` draws the held-out split task by task (the first eval seeds of each task, up
to ``--eval-examples / len(tasks)`` each); ``--random-init`` keeps the tokenizer folder's config
with random weights (same cost per step and per example: a timing probe for sizing a run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from lrsa_serve.config import LagKVConfig
from lrsa_serve.models import load_tokenizer
from lrsa_serve.reference_attention import use_lagkv_reference
from lrsa_serve.training import data as data_mod
from lrsa_serve.training import model as model_mod
from lrsa_serve.training.config import JobConfig
from lrsa_serve.training.evaluate import evaluate_examples, task_of
from lrsa_serve.training.loop import Trainer


def score(model, examples, tokenizer, mode: str, cfg: LagKVConfig, batch_size: int) -> dict:
    """Exact match with the whole model in float32: ``uncompressed`` (SDPA) or ``lagkv``."""
    if mode == "uncompressed":
        model.set_attn_implementation("sdpa")
    else:
        use_lagkv_reference(model, cfg)
    device = next(model.parameters()).device
    # Eager: the trainer compiled the layers around its own attention; switching the attention
    # here would recompile them per length (the LagKV eval took 3x longer that way).
    with torch.compiler.set_stance("force_eager"):
        sums = evaluate_examples(model, examples, tokenizer, batch_size=batch_size, device=device)
    return sums.scores()


SMOKE = dict(sink=16, lag=64, steps=3, batch_size=2, grad_accum=1, train_examples=8,
             eval_examples=8, eval_batch_size=2, min_tokens=300, max_tokens=600,
             max_len=1024)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local HF model folder")
    parser.add_argument("--gguf", help="GGUF file (with --tokenizer) instead of --model")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: --model)")
    parser.add_argument("--out", default="lrsa_vs_dense")
    parser.add_argument("--sink", type=int, default=32)
    parser.add_argument("--lag", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--train-examples", type=int, default=640)
    parser.add_argument("--eval-examples", type=int, default=96)
    parser.add_argument("--eval-batch-size", type=int, default=4)
    parser.add_argument("--balanced-eval", action="store_true", help="same count per task")
    parser.add_argument("--min-tokens", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=7900)
    parser.add_argument("--max-len", type=int, default=8192)
    parser.add_argument("--tasks", default="passkey,multikey_needle,kv_lookup,variable_tracking")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grad-checkpointing", action="store_true", help="(off: 135M fits)")
    parser.add_argument("--deadline", type=float, default=1e9, help="seconds; skip the base eval")
    parser.add_argument("--smoke", action="store_true", help="tiny random model on CPU")
    parser.add_argument("--random-init", action="store_true", help="random weights (timing)")
    parser.add_argument(
        "--attentions",
        nargs="+",
        choices=["dense", "lrsa"],
        default=["dense", "lrsa"],
        help="which post-trainings to run (one per call where a call's time is short)",
    )
    parser.add_argument(
        "--table", nargs="+", metavar="RESULTS_JSON", help="print one table of saved results"
    )
    args = parser.parse_args()
    if args.table:
        runs: dict = {}
        for path in args.table:
            result = json.loads(Path(path).read_text())
            runs |= result["runs"]
        print_table(result | {"runs": runs})
        return 0
    if args.smoke:  # a minute on CPU: a check that the whole script runs, not a measurement
        for name, value in SMOKE.items():
            setattr(args, name, value)
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = LagKVConfig(sink=args.sink, lag=args.lag, ratio=args.ratio)
    tasks = tuple(args.tasks.split(","))

    if args.smoke:
        from benchmarks.random_models import random_model, tiny_config, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        model = random_model(tiny_config("llama", vocab_size=len(tokenizer)))
    elif args.random_init:
        from transformers import AutoConfig, AutoModelForCausalLM

        folder = args.tokenizer or args.model
        tokenizer = load_tokenizer(folder)
        config = AutoConfig.from_pretrained(folder)
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation="sdpa"
        )
    elif args.gguf:
        gguf = Path(args.gguf).expanduser()
        tokenizer = load_tokenizer(args.tokenizer)
        model = model_mod.load_model(str(gguf.parent), gguf_file=gguf.name)
    else:
        tokenizer = load_tokenizer(args.tokenizer or args.model)
        model = model_mod.load_model(args.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    base_state = {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}
    loaded_s = time.time() - started

    def examples(count: int, split: str):
        made = data_mod.synthetic_examples(
            tokenizer, count, split, args.min_tokens, args.max_tokens, tasks
        )
        return data_mod.apply_length_policy(made, args.max_len, "skip")

    def balanced(count: int, split: str):
        """The first ``count // len(tasks)`` examples of each task in seed order (a task is
        drawn before its prompt is tokenized, so only the kept ones are encoded)."""
        quota, made = dict.fromkeys(tasks, count // len(tasks)), []
        for index in range(100 * count + 100):
            if not any(quota.values()):
                break
            example = data_mod.synthetic_example(
                tokenizer, index, split, args.min_tokens, args.max_tokens, tasks
            )
            if not quota[example.task]:
                continue
            quota[example.task] -= 1
            where = f"synthetic:{split}:{example.seed}:{example.task}"
            record = data_mod.synthetic_record(example, tokenizer)
            encoded = data_mod.encode_record(record, tokenizer, where)
            made.append(
                data_mod.TokenizedExample(
                    encoded.input_ids, encoded.labels, encoded.source, example.answer
                )
            )
        return data_mod.apply_length_policy(made, args.max_len, "skip")

    train, train_stats = examples(args.train_examples, "train")
    held_out, _ = (balanced if args.balanced_eval else examples)(args.eval_examples, "eval")
    held_out.sort(key=len)  # less padding per eval batch; scores are per example
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "lagkv": cfg.model_dump(),
        "args": vars(args),
        "train_data": train_stats.to_dict(),
        "eval_examples": len(held_out),
        "eval_tasks": {t: sum(task_of(e) == t for e in held_out) for t in tasks},
        "eval_tokens": sum(map(len, held_out)),
        "load_s": loaded_s,
        "data_s": time.time() - started - loaded_s,
        "runs": {},
    }

    def save():
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")

    for attention in args.attentions:
        model.load_state_dict(base_state)
        shutil.rmtree(out / attention, ignore_errors=True)  # metrics of an earlier try
        job = JobConfig(lagkv=cfg)
        job.model.attention = attention
        job.model.gradient_checkpointing = args.grad_checkpointing
        job.data.max_len = args.max_len
        job.data.batch_size = args.batch_size
        job.optim.lr = args.lr
        job.optim.warmup_steps = max(1, args.steps // 10)
        job.train.steps = args.steps
        job.train.grad_accum = args.grad_accum
        job.train.seed = args.seed
        job.train.out_dir = str(out / attention)
        job.train.eval_every = 0
        job.train.save_every = 0
        job.train.save_final = False
        job.train.export = False
        job.train.progress = False
        t0 = time.time()
        trainer = Trainer(
            job, model=model, tokenizer=tokenizer, train_examples=train, eval_examples=[]
        )
        last = trainer.run()
        run = {"train_s": time.time() - t0, "final_train_loss": last.get("loss")}
        lines = (out / attention / "metrics.jsonl").read_text().splitlines()
        run["loss_curve"] = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
        for mode in ("uncompressed", "lagkv"):
            t1 = time.time()
            run[mode] = score(model, held_out, tokenizer, mode, cfg, args.eval_batch_size)
            run[f"{mode}_eval_s"] = time.time() - t1
        result["runs"][attention] = run
        save()
        print(json.dumps({attention: {k: v for k, v in run.items() if k != "loss_curve"}}))

    if time.time() - started < args.deadline:
        model.load_state_dict(base_state)
        base = {}
        for mode in ("uncompressed", "lagkv"):
            t1 = time.time()
            base[mode] = score(model, held_out, tokenizer, mode, cfg, args.eval_batch_size)
            base[f"{mode}_eval_s"] = time.time() - t1
        result["runs"]["untrained"] = base
        save()

    print_table(result)
    return 0


def print_table(result: dict) -> None:
    args = argparse.Namespace(**result["args"])
    cfg = LagKVConfig(**result["lagkv"])
    tasks = tuple(args.tasks.split(","))
    print(
        f"\n{result['device']}: {args.steps} steps x {args.batch_size * args.grad_accum} seqs, "
        f"{args.min_tokens}-{args.max_tokens} tokens, lr {args.lr}, {cfg.short()}; "
        f"exact match on {result['eval_examples']} held-out examples"
    )
    print(
        f"one example = {100 / max(result['eval_examples'], 1):.2f} points; "
        f"per task {result['eval_tasks']}"
    )
    print(f"{'trained with':>13} {'uncompressed':>13} {'LagKV':>7} {'train s':>8}  per task")
    for name, run in result["runs"].items():
        unc, lag = run["uncompressed"], run["lagkv"]
        per_task = ", ".join(
            f"{t} {100 * unc[key]:.0f}->{100 * lag[key]:.0f}"
            for t in tasks
            if (key := f"eval_exact_match/{t}") in unc
        )
        print(
            f"{name:>13} {100 * unc['eval_exact_match']:>12.1f}% "
            f"{100 * lag['eval_exact_match']:>6.1f}% {run.get('train_s', 0):>8.0f}  {per_task}"
        )


if __name__ == "__main__":
    sys.exit(main())
