"""Synthetic long-context tasks, generated locally from seeds (no data hub).

One module for both sides: the trainer draws training examples from it and ``lrsa eval`` draws
held-out ones, with disjoint seed ranges (``split``), so what is evaluated was never trained on.
Every example is a prompt, the exact answer, and where the needle sits.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

# Seeds of the eval split live in their own range so no train seed ever collides with one.
EVAL_SEED_OFFSET = 1_000_000_007

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str
    target_tokens: int  # prompt length asked for
    depth: float  # where the needle sits, 0 = start, 1 = end
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def split_seed(seed: int, split: str) -> int:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    return seed + (EVAL_SEED_OFFSET if split == "eval" else 0)


def fill_to_length(
    tokenizer: Tokenizer, head: str, needle: str, tail: str, tokens: int, depth: float
) -> str:
    """head + filler with the needle at ``depth`` + tail, about ``tokens`` tokens long."""
    fixed = len(tokenizer.encode(head + needle + tail, add_special_tokens=False))
    per_filler = len(tokenizer.encode(FILLER * 8, add_special_tokens=False)) / 8
    repeats = max(0, int((tokens - fixed) / per_filler))
    before = round(repeats * depth)
    return head + FILLER * before + needle + FILLER * (repeats - before) + tail


def passkey(tokenizer: Tokenizer, tokens: int, depth: float, seed: int) -> Example:
    """The LagKV paper's passkey retrieval: a 5-digit number hidden in repeated filler."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    head = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "it. I will quiz you about the important information there.\n"
    )
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    tail = "\nWhat is the pass key? The pass key is"
    prompt = fill_to_length(tokenizer, head, needle, tail, tokens, depth)
    return Example("passkey", prompt, key, tokens, depth, seed)


TaskFn = Callable[[Tokenizer, int, float, int], Example]
TASKS: dict[str, TaskFn] = {"passkey": passkey}
