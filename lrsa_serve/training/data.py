"""Training data: JSONL or built-in synthetic long-context QA, tokenized with loss masks, in a
deterministic length-bucketed order.

Record formats (one JSON object per line; blank lines are ignored):

- ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}``:
  rendered with the tokenizer's chat template; the loss is on the assistant turns (their content
  and the end-of-turn marker the template puts after it).
- ``{"prompt": ..., "completion": ...}``: plain text, ``prompt`` tokenized with the tokenizer's
  special tokens (BOS where it adds one), then ``completion`` and EOS; loss on completion + EOS.

A malformed line, a missing or mistyped field, an empty completion or assistant turn stops with
a ``DataError`` naming the file and line. Examples over ``max_len`` follow ``overlong``:
``skip`` (default; cutting a long-context QA example at either end breaks it: the evidence or the
answer goes) or ``truncate`` (keep the first ``max_len`` tokens; an example left with no loss
token is skipped). Both counts are reported in ``DataStats`` and the metrics log.

Order: micro-batch ``k`` of a run is a pure function of (seed, k) (``BatchPlan``), so a resumed
run sees exactly the batches the killed one would have seen, and N ranks with accumulation A see
the same global batches as one rank with accumulation N*A.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lrsa_serve.errors import UserError
from lrsa_serve.synthetic_tasks import TASKS, Example, split_seed

IGNORE_INDEX = -100  # label of tokens without loss (torch's cross_entropy default)


class DataError(UserError):
    """Bad training data; the message names the file and line."""


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where there is no loss; else the token itself
    source: str  # "file:line" or "synthetic:<split>:<seed>"
    answer: str | None = None  # synthetic examples: the exact answer text

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class DataStats:
    examples: int = 0
    skipped_overlong: int = 0
    truncated_overlong: int = 0
    tokens: int = 0
    target_tokens: int = 0
    longest: int = 0


# ---- encoding one record ------------------------------------------------------------------------
def _text_field(record: dict, name: str, where: str) -> str:
    if name not in record:
        raise DataError(f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, not {type(value).__name__}")
    return value


def encode_prompt_completion(record: dict, tokenizer: Any, where: str) -> TokenizedExample:
    prompt = _text_field(record, "prompt", where)
    completion = _text_field(record, "completion", where)
    if not completion.strip():
        raise DataError(f"{where}: empty completion")
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
    return TokenizedExample(
        input_ids=[*prompt_ids, *completion_ids],
        labels=[IGNORE_INDEX] * len(prompt_ids) + completion_ids,
        source=where,
    )


def encode_messages(record: dict, tokenizer: Any, where: str) -> TokenizedExample:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{i}] must be an object")
        _text_field(message, "role", f"{where}: messages[{i}]")
        _text_field(message, "content", f"{where}: messages[{i}]")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: 'messages' needs a tokenizer with a chat template")

    def render(upto: int, generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(
            messages[:upto], tokenize=False, add_generation_prompt=generation_prompt
        )

    text = render(len(messages))
    spans: list[tuple[int, int]] = []  # character ranges with loss
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if not message["content"].strip():
            raise DataError(f"{where}: messages[{i}] is an empty assistant turn")
        if i == 0:
            raise DataError(f"{where}: messages[0] is an assistant turn with nothing before it")
        before, upto = render(i, generation_prompt=True), render(i + 1)
        if not (text.startswith(before) and text.startswith(upto) and upto.startswith(before)):
            raise DataError(
                f"{where}: the chat template does not render turns as prefixes of the "
                "conversation, so assistant tokens cannot be located"
            )
        # The turn's content and its end-of-turn marker; not the template's trailing newline.
        spans.append((len(before), len(upto.rstrip())))
    if not spans:
        raise DataError(f"{where}: no assistant turn (nothing to train on)")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    labels = [
        token
        if any(lo <= start and end <= hi and end > start for lo, hi in spans)
        else IGNORE_INDEX
        for token, (start, end) in zip(ids, offsets, strict=True)
    ]
    example = TokenizedExample(input_ids=list(ids), labels=labels, source=where)
    if example.num_targets == 0:
        raise DataError(f"{where}: assistant turns produced no tokens")
    return example


def encode_record(record: Any, tokenizer: Any, where: str) -> TokenizedExample:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return encode_messages(record, tokenizer, where)
    if "prompt" in record or "completion" in record:
        return encode_prompt_completion(record, tokenizer, where)
    raise DataError(f"{where}: missing field: need 'messages' or 'prompt' and 'completion'")


def read_jsonl(path: str | Path, tokenizer: Any) -> list[TokenizedExample]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    examples = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            examples.append(encode_record(record, tokenizer, where))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


# ---- synthetic long-context QA ------------------------------------------------------------------
# Re-draws of an over-long synthetic example (``synthetic_examples``); one is usually enough.
FIT_ATTEMPTS = 8


def synthetic_example(
    tokenizer: Any,
    index: int,
    split: str,
    min_tokens: int,
    max_tokens: int,
    tasks: Sequence[str],
    prompt_tokens: int | None = None,
) -> Example:
    """Example ``index`` of a split: task, length and depth drawn from its own seed, so train
    (seeds 0..) and eval (seeds offset by ``tasks.EVAL_SEED_OFFSET``) never share one.
    ``prompt_tokens`` replaces the drawn length (same task, depth and needle)."""
    seed = split_seed(index, split)
    rng = random.Random(seed)
    task = tasks[rng.randrange(len(tasks))]
    tokens = rng.randint(min_tokens, max_tokens)
    depth = rng.random()
    return TASKS[task](tokenizer, tokens if prompt_tokens is None else prompt_tokens, depth, seed)


def synthetic_examples(
    tokenizer: Any, count: int, split: str, min_tokens: int, max_tokens: int, tasks: Sequence[str]
) -> list[TokenizedExample]:
    """Examples ``0..count-1`` of a split, tokenized, prompts of ``min_tokens..max_tokens``
    tokens asked for and no example longer than ``max_tokens`` (where the task's own text
    allows)."""
    if unknown := [task for task in tasks if task not in TASKS]:
        raise UserError(f"unknown synthetic tasks {unknown}; known: {sorted(TASKS)}")
    out = []
    for index in range(count):
        example = synthetic_example(tokenizer, index, split, min_tokens, max_tokens, tasks)
        encoded = _encode_synthetic(example, tokenizer, split)
        # The drawn length is the prompt's, and only about: the task's wording, the chat
        # template and the answer come on top (up to ~70 tokens on the default model). An
        # example over max_tokens is drawn again with its prompt shorter by the excess, so none
        # exceeds it and a run whose max_len is max_tokens skips nothing. The cut doubles on
        # each attempt: filler comes in ~20-token sentences, so a cut of 1-2 tokens may
        # change nothing.
        for attempt in range(FIT_ATTEMPTS):
            shorter = example.target_tokens - (len(encoded) - max_tokens) * 2**attempt
            if len(encoded) <= max_tokens or shorter < 1:
                break
            drawn = (tokenizer, index, split, min_tokens, max_tokens, tasks)
            example = synthetic_example(*drawn, prompt_tokens=shorter)
            encoded = _encode_synthetic(example, tokenizer, split)
        out.append(encoded)
    return out


def _encode_synthetic(example: Example, tokenizer: Any, split: str) -> TokenizedExample:
    """Chat models get the task as a user turn and the answer as the assistant turn."""
    record = {"prompt": example.prompt, "completion": " " + example.answer}
    if getattr(tokenizer, "chat_template", None) is not None:
        turns = [("user", example.prompt), ("assistant", example.answer)]
        record = {"messages": [{"role": role, "content": text} for role, text in turns]}
    where = f"synthetic:{split}:{example.seed}:{example.task}"
    return replace(encode_record(record, tokenizer, where), answer=example.answer)


# ---- length policy, order, batches --------------------------------------------------------------
def apply_length_policy(
    examples: Sequence[TokenizedExample], max_len: int, policy: str
) -> tuple[list[TokenizedExample], DataStats]:
    stats, kept = DataStats(), []
    for example in examples:
        if len(example) > max_len:
            if policy == "skip":
                stats.skipped_overlong += 1
                continue
            example = TokenizedExample(
                example.input_ids[:max_len], example.labels[:max_len], example.source, None
            )
            if example.num_targets == 0:
                stats.skipped_overlong += 1
                continue
            stats.truncated_overlong += 1
        kept.append(example)
        stats.tokens += len(example)
        stats.target_tokens += example.num_targets
        stats.longest = max(stats.longest, len(example))
    stats.examples = len(kept)
    return kept, stats


def fingerprint(examples: Sequence[TokenizedExample]) -> str:
    """Identifies the tokenized data, so a resume on different data is refused."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.input_ids, example.labels]).encode())
    return digest.hexdigest()[:16]


@dataclass
class BatchPlan:
    """Which examples form micro-batch ``k`` of the run, for any ``k``: a pure function of the
    seed, so resuming and re-sharding reproduce the order exactly.

    Each epoch shuffles the examples (``Random(seed, epoch)``), sorts pools of
    ``pool_batches`` micro-batches by length (length bucketing: little padding) and shuffles the
    micro-batches again so lengths are not visited in order.
    """

    lengths: Sequence[int]
    batch_size: int
    seed: int = 0
    pool_batches: int = 64
    _epochs: dict[int, list[list[int]]] = field(default_factory=dict, repr=False)

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            rng = random.Random(f"{self.seed}:{epoch}")
            order = list(range(len(self.lengths)))
            rng.shuffle(order)
            pool = self.batch_size * self.pool_batches
            batches = []
            for start in range(0, len(order), pool):
                chunk = sorted(order[start : start + pool], key=lambda i: self.lengths[i])
                batches += [
                    chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)
                ]
            rng.shuffle(batches)
            self._epochs = {epoch: batches}  # one epoch in memory at a time
        return self._epochs[epoch]

    def micro_batch(self, index: int) -> list[int]:
        epoch, position = divmod(index, self.batches_per_epoch)
        return self.epoch(epoch)[position]

    def step_micro_batches(self, step: int, per_step: int) -> list[list[int]]:
        """The ``per_step`` (= grad_accum x world size) micro-batches of optimizer step ``step``."""
        return [self.micro_batch(step * per_step + j) for j in range(per_step)]


def collate(
    examples: Sequence[TokenizedExample], pad_id: int, pad_multiple: int = 1
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``labels`` ``[B, T]``; T rounded up to ``pad_multiple``;
    and ``positions`` (``target_positions``), counted here on the host so that the step's forward
    never has to read it back from the device.

    No attention mask is returned on purpose: with right padding and causal attention no real
    token sees a pad, and without a mask SDPA keeps its fast causal kernels (the LRSA attention
    ignores masks anyway). Pads carry IGNORE_INDEX labels.
    """
    longest = max(len(example) for example in examples)
    width = -(-longest // pad_multiple) * pad_multiple
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example)] = torch.tensor(example.input_ids)
        labels[row, : len(example)] = torch.tensor(example.labels)
    return {"input_ids": input_ids, "labels": labels, "positions": target_positions(labels)}


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions ``[K]`` whose next token is a target in some row of ``labels`` ``[B, T]``:
    where the LM head runs (``evaluate.target_logits``). Its size depends on the data, so on a
    GPU this reads the device: call it where the labels are still on the host."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)


def pad_token_id(tokenizer: Any) -> int:
    candidates = (tokenizer.pad_token_id, tokenizer.eos_token_id)
    return int(next((token for token in candidates if token is not None), 0))
