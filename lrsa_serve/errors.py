"""Failures a user can fix: ``lrsa`` prints them as one line and exits 2 (``cli.main``).

Library modules raise these without importing the command-line entry point.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can fix; printed as one line."""


def one_line(error: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none; for pydantic's
    validation errors, whose first line only names the model, what failed."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return "; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
