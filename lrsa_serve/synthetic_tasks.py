"""Synthetic long-context tasks, generated locally from seeds (no data hub).

One module for both sides: the trainer draws training examples from it and ``lrsa eval`` draws
held-out ones, with disjoint seed ranges (``split``), so what is evaluated was never trained on.
Every example is a prompt, the exact answer, and where the needle sits.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

# Seeds of the eval split live in their own range so no train seed ever collides with one.
EVAL_SEED_OFFSET = 1_000_000_007

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
NIAH_HEAD = (
    "Some special magic numbers are hidden inside the following text. Make sure to memorize "
    "them. I will quiz you about the numbers afterwards.\n"
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


def split_seed(seed: int, split: str) -> int:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    return seed + (EVAL_SEED_OFFSET if split == "eval" else 0)


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
    prompt = fill_with_needles(tokenizer, head, [(depth, needle)], tail, tokens)
    return Example("passkey", prompt, key, tokens, depth, seed)


# ---- RULER-style retrieval tasks (training and eval) --------------------------------------------
def fill_with_needles(
    tokenizer: Tokenizer, head: str, needles: list[tuple[float, str]], tail: str, tokens: int
) -> str:
    """head + filler with each ``(depth, text)`` needle at its depth + tail, about ``tokens``
    tokens long. Needles at the same depth keep their given order."""
    fixed_text = head + "".join(text for _, text in needles) + tail
    fixed = len(tokenizer.encode(fixed_text, add_special_tokens=False))
    per_filler = len(tokenizer.encode(FILLER * 8, add_special_tokens=False)) / 8
    repeats = max(0, int((tokens - fixed) / per_filler))
    parts, done = [head], 0
    for depth, text in sorted(needles, key=lambda needle: needle[0]):
        at = min(repeats, max(done, round(repeats * depth)))
        parts += [FILLER * (at - done), text]
        done = at
    parts += [FILLER * (repeats - done), tail]
    return "".join(parts)


def _word(rng: random.Random, letters: int = 5) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(letters))


def magic_number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def magic_needle(key: str, number: str) -> str:
    return f"One of the special magic numbers for {key} is: {number}. "


def distinct(rng: random.Random, count: int, make: Callable[[random.Random], str]) -> list[str]:
    """``count`` different values of ``make(rng)``, in the order first drawn."""
    out: dict[str, None] = {}  # insertion-ordered set: deterministic order, O(1) membership
    while len(out) < count:
        out.setdefault(make(rng), None)
    return list(out)


def _hex(rng: random.Random, digits: int) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(digits))


def multikey_needle(tokenizer: Tokenizer, tokens: int, depth: float, seed: int) -> Example:
    """RULER's multi-key needle: four keyed magic numbers; the question names one key (its needle
    sits at ``depth``, the three distractors at random depths)."""
    rng = random.Random(seed)
    keys = distinct(rng, 4, lambda rng: _word(rng).lower())
    numbers = [magic_number(rng) for _ in keys]
    needles = [(depth, magic_needle(keys[0], numbers[0]))]
    needles += [
        (rng.random(), magic_needle(key, number))
        for key, number in zip(keys[1:], numbers[1:], strict=True)
    ]
    tail = (
        f"\nWhat is the special magic number for {keys[0]} mentioned in the provided text? "
        f"The special magic number for {keys[0]} is"
    )
    prompt = fill_with_needles(tokenizer, NIAH_HEAD, needles, tail, tokens)
    return Example("multikey_needle", prompt, numbers[0], tokens, depth, seed)


def kv_lookup(tokenizer: Tokenizer, tokens: int, depth: float, seed: int) -> Example:
    """RULER's key-value retrieval: the haystack is a JSON object of random hex keys and values,
    the question asks for the value of the key at ``depth``."""
    rng = random.Random(seed)
    head = "Extract the value corresponding to the specified key in the JSON object below.\n{"
    sample = ", ".join(f'"{_hex(rng, 8)}": "{_hex(rng, 8)}"' for _ in range(16))
    per_pair = len(tokenizer.encode(sample, add_special_tokens=False)) / 16
    tail = '}}\nKey: "{key}"\nThe value associated with key "{key}" is'
    fixed = len(tokenizer.encode(head + tail.format(key=_hex(rng, 8)), add_special_tokens=False))
    count = max(2, int((tokens - fixed) / per_pair))
    pairs: dict[str, str] = {}
    while len(pairs) < count:
        pairs.setdefault(_hex(rng, 8), _hex(rng, 8))
    items = list(pairs.items())
    while True:
        # Hex tokenizes unevenly, so the estimate can overshoot (by ~4% at 4-8K tokens): pairs
        # come off the end until the prompt fits, the asked-for key staying at its depth.
        key, value = items[min(count - 1, round(depth * (count - 1)))]
        body = ", ".join(f'"{k}": "{v}"' for k, v in items[:count])
        prompt = head + body + tail.format(key=key)
        excess = len(tokenizer.encode(prompt, add_special_tokens=False)) - tokens
        if excess <= 0 or count == 2:
            return Example("kv_lookup", prompt, value, tokens, depth, seed)
        count = max(2, count - math.ceil(excess / per_pair))


def variable_tracking(tokenizer: Tokenizer, tokens: int, depth: float, seed: int) -> Example:
    """RULER's variable tracking: ``VAR A = 12345`` then a chain ``VAR B = VAR A`` ... spread
    through filler (the first assignment at ``depth``, the rest after it); the answer lists
    every variable of the chain in order."""
    rng = random.Random(seed)
    names = distinct(rng, 4, _word)
    value = str(rng.randint(10000, 99999))
    later = sorted(depth + (1 - depth) * rng.random() for _ in names[1:])
    needles = [(depth, f"VAR {names[0]} = {value}. ")]
    needles += [
        (at, f"VAR {name} = VAR {previous}. ")
        for at, previous, name in zip(later, names[:-1], names[1:], strict=True)
    ]
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
    tail = (
        f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
        "Answer: According to the chain(s) of variable assignment in the text above, the "
        "variables assigned the value are:"
    )
    prompt = fill_with_needles(tokenizer, head, needles, tail, tokens)
    return Example("variable_tracking", prompt, " ".join(names), tokens, depth, seed)


# ---- question answering over a document of look-alike records ---------------------------------
# LRSA's reported gain is QA accuracy under compression. These documents are all facts of one
# kind about made-up people and places (every record a distractor for the others, as the other
# passages of a multi-document QA prompt are), so a cache that keeps tokens without knowing the
# question must keep the right record; the answer is a made-up word that occurs once.
QA_HEAD = (
    "Answer the question based on the records below. Only give the answer and do not output "
    "any other words.\n\n"
)
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _name(rng: random.Random, syllables: int = 2) -> str:
    """A pronounceable made-up word, capitalised: consonant-vowel syllables, maybe a last
    consonant (``Tarol``, ``Menivad``)."""
    word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))
    return (word + rng.choice(("", "", "n", "r", "s", "d"))).capitalize()


def _person(rng: random.Random) -> str:
    return f"{_name(rng, rng.choice((2, 3)))} {_name(rng)}"


def fresh(rng: random.Random, taken: set[str], make: Callable[[random.Random], str]) -> str:
    """A value of ``make(rng)`` not in ``taken``, which it joins."""
    while (value := make(rng)) in taken:
        pass
    taken.add(value)
    return value


def records_prompt(
    tokenizer: Tokenizer,
    make_records: Callable[[int], list[str]],
    placed: list[tuple[float, str]],
    tail: str,
    tokens: int,
) -> str:
    """``QA_HEAD`` + records + ``tail``, at most ``tokens`` tokens: ``make_records(count)`` gives
    ``count`` distractor records (one sentence each; the same ones for the same count), and each
    ``(depth, record)`` of ``placed`` goes at its depth among them."""
    per_record = len(tokenizer.encode(" ".join(make_records(16)), add_special_tokens=False)) / 16
    placed_text = " ".join(record for _, record in placed)
    fixed = len(tokenizer.encode(QA_HEAD + placed_text + tail, add_special_tokens=False))
    count = max(0, int((tokens - fixed) / per_record))
    while True:
        records = make_records(count)
        for depth, record in sorted(placed, key=lambda item: item[0]):
            records.insert(round(depth * len(records)), record)
        prompt = QA_HEAD + " ".join(records) + tail
        # Made-up names tokenize unevenly: records come off until the prompt fits.
        excess = len(tokenizer.encode(prompt, add_special_tokens=False)) - tokens
        if excess <= 0 or count == 0:
            return prompt
        count = max(0, count - math.ceil(excess / per_record))


def _records_rng(seed: int) -> random.Random:
    """The distractors' own stream: not ``Random(seed + 1)``, which is the next example's."""
    return random.Random(f"records:{seed}")


def _town(rng: random.Random) -> str:
    return _name(rng, rng.choice((2, 3)))


def _firm(rng: random.Random) -> str:
    return _name(rng) + rng.choice((" Ltd", " Works", " & Co"))


def fact_qa(tokenizer: Tokenizer, tokens: int, depth: float, seed: int) -> Example:
    """Single-fact QA: a register of where people were born; the question asks for the
    birthplace of the person whose record sits at ``depth``."""
    rng = random.Random(seed)
    people: set[str] = set()
    towns: set[str] = set()
    person, town = fresh(rng, people, _person), fresh(rng, towns, _town)
    record = "{} was born in {}.".format

    def make(count: int) -> list[str]:
        draw, seen_people, seen_towns = _records_rng(seed), set(people), set(towns)
        return [
            record(fresh(draw, seen_people, _person), fresh(draw, seen_towns, _town))
            for _ in range(count)
        ]

    tail = f"\n\nQuestion: In which town was {person} born? Answer:"
    prompt = records_prompt(tokenizer, make, [(depth, record(person, town))], tail, tokens)
    return Example("fact_qa", prompt, town, tokens, depth, seed)


def multihop_qa(tokenizer: Tokenizer, tokens: int, depth: float, seed: int) -> Example:
    """Two-hop QA: records of who works for which company and of where companies have their
    head office, shuffled; the question asks for the town of the asked person's employer. The
    person's record sits at ``depth``, the employer's anywhere."""
    rng = random.Random(seed)
    people: set[str] = set()
    firms: set[str] = set()
    towns: set[str] = set()
    person, firm, town = (fresh(rng, people, _person), fresh(rng, firms, _firm),
                          fresh(rng, towns, _town))  # fmt: skip
    works = "{} works for {}.".format
    office = "{} has its head office in {}.".format

    def make(count: int) -> list[str]:
        # Other people, firms and towns, both kinds of record about each firm, in a shuffled
        # order: where a record sits says nothing about which other record it goes with.
        draw = _records_rng(seed)
        seen = set(people), set(firms), set(towns)
        records = []
        for _ in range((count + 1) // 2):
            other, employer, where = (fresh(draw, taken, kind) for taken, kind in
                                      zip(seen, (_person, _firm, _town), strict=True))  # fmt: skip
            records += [works(other, employer), office(employer, where)]
        draw.shuffle(records)
        return records[:count]

    placed = [(depth, works(person, firm)), (rng.random(), office(firm, town))]
    tail = (
        f"\n\nQuestion: In which town is the head office of the company {person} works for? Answer:"
    )
    prompt = records_prompt(tokenizer, make, placed, tail, tokens)
    return Example("multihop_qa", prompt, town, tokens, depth, seed)


TaskFn = Callable[[Tokenizer, int, float, int], Example]
TASKS: dict[str, TaskFn] = {  # by function name
    task.__name__: task
    for task in (passkey, multikey_needle, kv_lookup, variable_tracking, fact_qa, multihop_qa)
}
