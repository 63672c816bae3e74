"""The eval task registry and the grid of items one ``lrsa eval`` run asks.

Tasks come from two places: every generator of the training module
``lrsa_serve.synthetic_tasks.TASKS`` (passkey, multi-key needle, key-value lookup, variable
tracking, single-fact and two-hop QA, and whatever is added there later), drawn from its
**eval** seed split so nothing evaluated was trained on, and the RULER-style generators of
``lrsa_serve.eval.ruler``. Each task says how its answer is scored (one value or several) and
how many tokens an answer needs.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from lrsa_serve import synthetic_tasks
from lrsa_serve.eval.ruler import RULER_TASKS
from lrsa_serve.synthetic_tasks import Example, TaskFn, Tokenizer, split_seed

# Tasks whose answer is several values joined by spaces; scored by the fraction recalled.
MULTI_VALUE = {"variable_tracking", "niah_multivalue", "niah_multiquery", "common_words"}
# Tasks where the needle's depth means nothing (left out of the depth heat map).
NO_DEPTH = {"common_words"}
# Answer budget per task; anything else gets DEFAULT_MAX_TOKENS.
MAX_TOKENS = {
    "passkey": 12,
    "niah_single": 16,
    "multikey_needle": 16,
    "kv_lookup": 16,
    "variable_tracking": 40,
    "niah_multivalue": 64,
    "niah_multiquery": 64,
    "common_words": 80,
    "fact_qa": 16,
    "multihop_qa": 16,
}
DEFAULT_MAX_TOKENS = 32
DEFAULT_TASKS = (
    "passkey",
    "niah_single",
    "multikey_needle",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
    "common_words",
    "kv_lookup",
    "fact_qa",
    "multihop_qa",
)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    generate: TaskFn
    multi_value: bool
    uses_depth: bool
    max_tokens: int
    # "training" (lrsa_serve.synthetic_tasks, eval split) or "ruler" (lrsa_serve.eval.ruler)
    source: str


def registry() -> dict[str, TaskSpec]:
    """All tasks, read at call time so generators added to ``lrsa_serve.synthetic_tasks`` appear."""
    found = {name: (fn, "training") for name, fn in synthetic_tasks.TASKS.items()}
    found |= {name: (fn, "ruler") for name, fn in RULER_TASKS.items() if name not in found}
    return {
        name: TaskSpec(
            name=name,
            generate=fn,
            multi_value=name in MULTI_VALUE,
            uses_depth=name not in NO_DEPTH,
            max_tokens=MAX_TOKENS.get(name, DEFAULT_MAX_TOKENS),
            source=source,
        )
        for name, (fn, source) in found.items()
    }


def resolve_tasks(names: Sequence[str] | None) -> list[TaskSpec]:
    """Task names (or the groups ``all``, ``ruler``, ``qa`` = the training generator's tasks)
    into specs, in the order given; ValueError names the unknown ones."""
    specs = registry()
    wanted: list[str] = []
    for name in names or DEFAULT_TASKS:
        if name == "all":
            wanted += list(specs)
        elif name == "ruler":
            wanted += [n for n, s in specs.items() if s.source == "ruler"]
        elif name == "qa":
            wanted += [n for n, s in specs.items() if s.source == "training"]
        else:
            wanted.append(name)
    if unknown := [name for name in wanted if name not in specs]:
        raise ValueError(
            f"unknown task(s) {', '.join(unknown)}; known: {', '.join(sorted(specs))} "
            "(groups: all, ruler, qa)"
        )
    return [specs[name] for name in dict.fromkeys(wanted)]


@dataclass(frozen=True)
class EvalItem:
    """One prompt to ask: the example plus what scoring needs."""

    id: str
    example: Example
    expected: tuple[str, ...]  # values the response must contain
    multi_value: bool
    uses_depth: bool
    max_tokens: int

    @property
    def task(self) -> str:
        return self.example.task

    @property
    def length(self) -> int:
        return self.example.target_tokens

    @property
    def depth(self) -> float:
        return self.example.depth


def expected_values(answer: str, multi_value: bool) -> tuple[str, ...]:
    return tuple(answer.replace(",", " ").split()) if multi_value else (answer.strip(),)


def item_seed(seed: int, task: str, length: int, depth: float, sample: int) -> int:
    """Eval-split seed of one grid cell: a pure function of the cell, so an item does not change
    when other tasks, lengths or depths are added to a run."""
    return split_seed(zlib.crc32(f"{seed}:{task}:{length}:{depth:g}:{sample}".encode()), "eval")


def build_items(
    tokenizer: Tokenizer,
    specs: Sequence[TaskSpec],
    lengths: Sequence[int],
    depths: Sequence[float],
    samples: int,
    seed: int = 0,
) -> list[EvalItem]:
    """Every task x length x depth x sample. Tasks without a depth still get one item per depth
    (at that nominal depth), so every task has the same number of items per length."""
    items = []
    for spec, length, depth, sample in itertools.product(specs, lengths, depths, range(samples)):
        example = spec.generate(
            tokenizer, length, depth, item_seed(seed, spec.name, length, depth, sample)
        )
        items.append(
            EvalItem(
                id=f"{spec.name}/{length}/{depth:g}/{sample}",
                example=example,
                expected=expected_values(example.answer, spec.multi_value),
                multi_value=spec.multi_value,
                uses_depth=spec.uses_depth,
                max_tokens=spec.max_tokens,
            )
        )
    return items
