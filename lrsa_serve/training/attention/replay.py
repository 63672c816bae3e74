"""Under gradient checkpointing, select once: the recompute replays the forward's kept positions.

A checkpointed decoder layer runs its forward twice, once in the forward pass and once more in
the backward pass to rebuild what its backward needs. LRSA's selection (no_grad) would run twice
too. ``checkpoint_contexts`` is a ``context_fn`` for non-reentrant ``torch.utils.checkpoint``: its
forward context records every selection the layer makes, its recompute context hands them back in
the same order instead of selecting again. So the backward differentiates exactly the attention
whose output the forward used (even if a recomputed key differed in the last bit and broke a tie
the other way), and the second selection costs nothing. Plain context managers, not dispatch
modes, so the compiled parts of the layer stay compiled. One memo per checkpointed call: it lives
as long as that call's recompute closure, and what it holds is small (``[B, Hkv, P, keep]``
positions per layer).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lrsa_serve import lagkv
from lrsa_serve.lagkv import Rule


@dataclass
class SelectionMemo:
    """The kept positions of one checkpointed call, in the order its forward selected them."""

    kept: list[torch.Tensor] = field(default_factory=list)
    replayed: int = 0


# (memo, replaying) of the checkpointed call running in this thread, if any. Autograd runs the
# recompute in its own worker thread; the context is entered there, so a ContextVar fits.
_ACTIVE: contextvars.ContextVar[tuple[SelectionMemo, bool] | None] = contextvars.ContextVar(
    "lrsa_selection_replay", default=None
)


class _Phase:
    """Makes ``memo`` the active one while entered; re-enterable (a second backward over a
    retained graph recomputes again, from the first selection)."""

    def __init__(self, memo: SelectionMemo, replaying: bool) -> None:
        self.memo, self.replaying = memo, replaying
        self._tokens: list[contextvars.Token] = []

    def __enter__(self) -> SelectionMemo:
        if self.replaying:
            self.memo.replayed = 0
        self._tokens.append(_ACTIVE.set((self.memo, self.replaying)))
        return self.memo

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._tokens.pop())


def checkpoint_contexts() -> tuple[_Phase, _Phase]:
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``."""
    memo = SelectionMemo()
    return _Phase(memo, replaying=False), _Phase(memo, replaying=True)


def remembered(
    select: Callable[[torch.Tensor, torch.Tensor, Rule], torch.Tensor],
    key: torch.Tensor,
    value: torch.Tensor,
    rule: Rule,
) -> torch.Tensor:
    """``select(key, value, rule)`` under no_grad (top-K has no gradient; gradients flow through
    the visible K/V): the kept positions ``[B, Hkv, P, keep]`` of ``key``/``value``
    ``[B, Hkv, n, D]``, outside checkpointing and in a checkpointed forward (recorded there); in
    the recompute, the recorded result of the same call. A replay whose shape does not fit
    ``key`` means the recompute took another path, which is an error."""
    active = _ACTIVE.get()
    if active is None or not active[1]:
        with torch.no_grad():
            kept = select(key, value, rule)
        if active is not None:
            active[0].kept.append(kept)
        return kept
    memo = active[0]
    if memo.replayed >= len(memo.kept):
        raise RuntimeError(
            f"checkpoint recompute asked for selection {memo.replayed + 1} but the forward made "
            f"only {len(memo.kept)}"
        )
    kept = memo.kept[memo.replayed]
    b, h, n = key.shape[:3]
    expected = (b, h, lagkv.compressed_partitions(n, rule), rule.keep)
    if tuple(kept.shape) != expected:
        raise RuntimeError(
            f"checkpoint recompute expected kept positions of shape {tuple(expected)}, the "
            f"forward selected {tuple(kept.shape)}"
        )
    memo.replayed += 1
    return kept
