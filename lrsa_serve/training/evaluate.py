"""Held-out evaluation: target-token loss and exact match under teacher forcing.

Exact match: every target token that is not a special token (end of turn, EOS) is the argmax
given the true prefix, which is exactly "greedy decoding starts with the answer", computed in one
forward pass per batch instead of a decode loop. Scores are also split by synthetic task.
``target_logits``, the forward at the target positions, is the training loss's too (``loop``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lrsa_serve.training.data import IGNORE_INDEX, TokenizedExample, collate, pad_token_id


def target_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits ``[B, K, V]`` at the batch's K target ``positions`` (``collate``) and the
    targets there ``[B, K]``. The LM head runs on those positions only: long-context QA has a
    few target tokens per 8-32K, and full logits would be 32K x vocab floats. Nothing is read
    back from the device."""
    positions = batch["positions"]
    out = model(input_ids=batch["input_ids"], logits_to_keep=positions, use_cache=False)
    return out.logits.float(), batch["labels"][:, 1:][:, positions]


def task_of(example: TokenizedExample) -> str:
    """ "synthetic:<split>:<seed>:<task>" -> task; JSONL examples count as "data"."""
    parts = example.source.split(":")
    return parts[3] if parts[0] == "synthetic" and len(parts) > 3 else "data"


@dataclass
class EvalSums:
    """Additive totals, so ranks (and batches) combine by summing: the target tokens' summed
    loss and count, and per task the examples and how many of them were exact matches."""

    loss: float = 0.0
    targets: float = 0.0
    examples: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    correct: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def scores(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "eval_loss": self.loss / max(self.targets, 1),
            "eval_exact_match": sum(self.correct.values()) / max(sum(self.examples.values()), 1),
        }
        for task in sorted(self.examples):
            out[f"eval_exact_match/{task}"] = self.correct[task] / self.examples[task]
        return out


@torch.no_grad()
def evaluate_examples(
    model: torch.nn.Module,
    examples: Sequence[TokenizedExample],
    tokenizer: Any,
    *,
    batch_size: int,
    device: torch.device,
    autocast: AbstractContextManager | None = None,
    pad_multiple: int = 64,
    rank: int = 0,
    world_size: int = 1,
) -> EvalSums:
    """This rank's sums over its share of ``examples`` (batches rank, rank+W, ...). Every rank
    runs the same number of forwards (FSDP needs all ranks in each), padding with repeats that
    count for nothing."""
    autocast = autocast or nullcontext()
    special = torch.tensor(sorted(tokenizer.all_special_ids), device=device)
    pad = pad_token_id(tokenizer)
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    sums = EvalSums()
    was_training = model.training
    model.eval()
    for round_ in range(-(-len(batches) // world_size)):
        index = round_ * world_size + rank
        real = index < len(batches)
        chunk = batches[index if real else 0]
        batch = {k: v.to(device) for k, v in collate(chunk, pad, pad_multiple).items()}
        with autocast:
            logits, labels = target_logits(model, batch)
        if not real:
            continue
        mask = labels != IGNORE_INDEX
        sums.loss += float(F.cross_entropy(logits[mask], labels[mask], reduction="sum"))
        sums.targets += float(mask.sum())
        scored = mask & ~torch.isin(labels, special)
        right = ((logits.argmax(-1) == labels) | ~scored).all(dim=1).tolist()
        for example, ok in zip(chunk, right, strict=True):
            sums.examples[task_of(example)] += 1
            sums.correct[task_of(example)] += ok
    model.train(was_training)
    return sums
