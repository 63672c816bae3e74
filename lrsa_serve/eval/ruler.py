"""RULER-style synthetic tasks that the training generator (``lrsa_serve.synthetic_tasks``) does
not have.

Built from ``synthetic_tasks.py``'s primitives (``Example``, the filler, its fill helpers and the
magic-number needles), with the same signature as ``synthetic_tasks.TASKS`` entries,
``(tokenizer, tokens, depth, seed) -> Example``, so the eval registry treats both alike.
Multi-value answers are the values joined by single spaces (as ``variable_tracking`` does);
``lrsa_serve.eval.tasks`` splits them back for partial credit.

Prompts follow RULER's templates (Hsieh et al. 2024, "RULER: What's the Real Context Size of
Your Long-Context Language Models?"), with the repeated-sentence haystack of ``tasks.FILLER``.
"""

from __future__ import annotations

import random

from lrsa_serve.synthetic_tasks import (
    NIAH_HEAD,
    Example,
    Tokenizer,
    distinct,
    fill_with_needles,
    magic_needle,
    magic_number,
)

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _pseudo_word(rng: random.Random, syllables: int = 3) -> str:
    """Pronounceable nonsense ('tomira'): no prior knowledge helps, and the tokenizer splits it
    into a few tokens the way it would a rare real word."""
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def niah_single(tokenizer: Tokenizer, tokens: int, depth: float, seed: int) -> Example:
    """RULER niah_single: one keyed 7-digit number at ``depth``, no distractors."""
    rng = random.Random(seed)
    key, value = _pseudo_word(rng), magic_number(rng)
    tail = (
        f"\nWhat is the special magic number for {key} mentioned in the provided text? "
        f"The special magic number for {key} mentioned in the provided text is"
    )
    needles = [(depth, magic_needle(key, value))]
    prompt = fill_with_needles(tokenizer, NIAH_HEAD, needles, tail, tokens)
    return Example("niah_single", prompt, value, tokens, depth, seed)


def _all_numbers(
    task: str,
    rng: random.Random,
    pairs: list[tuple[str, str]],
    asked: str,
    tokenizer: Tokenizer,
    tokens: int,
    depth: float,
    seed: int,
) -> Example:
    """One needle per (key, number) pair, the first at ``depth`` and the others at random
    depths; the question asks for every number of ``asked`` and the answer lists them all."""
    depths = [depth] + [rng.random() for _ in pairs[1:]]
    needles = [(at, magic_needle(*pair)) for at, pair in zip(depths, pairs, strict=True)]
    tail = (
        f"\nWhat are all the special magic numbers for {asked} mentioned in the provided text? "
        f"The special magic numbers for {asked} mentioned in the provided text are"
    )
    prompt = fill_with_needles(tokenizer, NIAH_HEAD, needles, tail, tokens)
    answer = " ".join(number for _, number in pairs)
    return Example(task, prompt, answer, tokens, depth, seed)


def niah_multivalue(tokenizer: Tokenizer, tokens: int, depth: float, seed: int) -> Example:
    """RULER niah_multivalue: one key with four numbers; the first at ``depth``, the
    others at random depths. The answer is all of them."""
    rng = random.Random(seed)
    key = _pseudo_word(rng)
    pairs = [(key, number) for number in distinct(rng, 4, magic_number)]
    return _all_numbers("niah_multivalue", rng, pairs, key, tokenizer, tokens, depth, seed)


def niah_multiquery(tokenizer: Tokenizer, tokens: int, depth: float, seed: int) -> Example:
    """RULER niah_multiquery: four keys with one number each, all asked at once; the
    first key's needle sits at ``depth``, the others at random depths. The answer lists the
    numbers in the order the question names their keys."""
    rng = random.Random(seed)
    keys = distinct(rng, 4, _pseudo_word)
    pairs = list(zip(keys, distinct(rng, 4, magic_number), strict=True))
    asked = ", ".join(keys[:-1]) + f", and {keys[-1]}"
    return _all_numbers("niah_multiquery", rng, pairs, asked, tokenizer, tokens, depth, seed)


def common_words(tokenizer: Tokenizer, tokens: int, depth: float, seed: int) -> Example:
    """RULER's common-word extraction (CWE): a numbered list of words in which ``top`` (10) words
    appear several times more often than the rest; the answer is those words.

    RULER repeats common words 30x and the others 3x at long lengths; short lists cannot hold
    10 x 30 entries, so the common frequency scales with the list (between 6x and 30x), always
    twice the uncommon words' 3x or more. ``depth`` is recorded but has no meaning here.
    """
    rng, top = random.Random(seed), 10
    head = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n"
    )
    tail = (
        f"\nQuestion: What are the {top} most common words in the above list? Answer: The top "
        f"{top} words that appear most often in the list are:"
    )

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    def render(words: list[str]) -> str:
        return head + " ".join(f"{i}. {word}" for i, word in enumerate(words, start=1)) + tail

    def build(entries: int) -> tuple[list[str], list[str]]:
        common_freq, uncommon_freq = min(30, max(6, entries // (2 * top))), 3
        uncommon_count = max(1, (entries - top * common_freq) // uncommon_freq)
        vocabulary = distinct(rng, top + uncommon_count, _pseudo_word)
        words = vocabulary[:top] * common_freq + vocabulary[top:] * uncommon_freq
        rng.shuffle(words)
        return words, vocabulary[:top]

    # Entry numbers get longer as the list grows, so size it twice: guess, measure, rescale.
    # The same rng state for both builds keeps the common words (drawn first) the same.
    fixed, state = count(render([])), rng.getstate()
    entries = max(top * 7, int((tokens - fixed) / 4))
    words, _ = build(entries)
    measured = count(render(words))
    entries = max(top * 7, round(entries * (tokens - fixed) / max(1, measured - fixed)))
    rng.setstate(state)
    words, common = build(entries)
    return Example("common_words", render(words), " ".join(common), tokens, depth, seed)


RULER_TASKS = {  # by function name
    task.__name__: task for task in (niah_single, niah_multivalue, niah_multiquery, common_words)
}
