"""Scoring a response against the expected values. The rules, in full:

1. **Normalise** response and values alike: Unicode NFKC, case-folded, every run of whitespace
   made one space, ends stripped, and digit-group separators dropped (``1,486,626`` reads as
   ``1486626``: a comma or underscore between a digit and exactly three digits).
2. A value is **recalled** when it occurs in the normalised response as a whole token: not
   preceded or followed by a letter or digit (``59682`` is not recalled by ``596821``; ``QPQSW``
   is recalled by ``var qpqsw,``). Extra text around it costs nothing, as in RULER.
3. **exact** = every expected value recalled (1 or 0).
4. **score** (partial credit) = fraction of the expected values recalled: for one-value tasks
   (passkey, needles, key-value lookup) the same as exact; for multi-value tasks (multi-value and
   multi-query needles, variable tracking, common words) 3 of 4 values score 0.75.

A request that failed (HTTP error, timeout, malformed body) is not scored: it counts as a failure,
and as 0 in the accuracy of its cell, so failures can only lower a score, never hide.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

_WHITESPACE = re.compile(r"\s+")
_DIGIT_GROUP = re.compile(r"(?<=\d)[,_](?=\d{3}(?!\d))")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _DIGIT_GROUP.sub("", text)
    return _WHITESPACE.sub(" ", text).strip()


def recalled(value: str, response: str) -> bool:
    """Whether ``value`` occurs in ``response`` as a whole token, after normalising both."""
    needle = normalize(value)
    if not needle:
        return False
    pattern = rf"(?<![^\W_]){re.escape(needle)}(?![^\W_])"
    return re.search(pattern, normalize(response)) is not None


@dataclass(frozen=True)
class Score:
    score: float  # fraction of expected values recalled
    exact: bool  # all of them
    recalled: tuple[str, ...]
    missing: tuple[str, ...]


def score_response(response: str, expected: Sequence[str]) -> Score:
    found = tuple(value for value in expected if recalled(value, response))
    missing = tuple(value for value in expected if value not in found)
    fraction = len(found) / len(expected) if expected else 0.0
    return Score(
        score=fraction, exact=bool(expected) and not missing, recalled=found, missing=missing
    )
