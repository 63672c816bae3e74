"""LagKV in plain torch: the reference every fast path (engine, kernels, trainer) is tested against.

Contract: ``docs/lagkv.md``. Positions ``t < S`` are the sink; ``t >= S`` belong to
partition ``w(t) = (t - S) // L``. Partition p is scored against partition p+1 (its "lag"
reference) once p+1 is complete, keeps ``keep = int(r * L)`` tokens per KV head, and is never
re-scored. A query at t sees: the sink, the kept tokens of partitions ``<= w(t) - 2``, the
whole partition ``w(t) - 1`` and its own partition causally.

Every function that needs the rule's numbers takes them as one :class:`Rule`; the functions on
one partition (scores, selection) take only what they read, as the paged-cache kernels call them
too. Tensors are laid out ``[..., tokens, head_dim]`` with any leading dims (batch, KV head).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Where a channel of the reference partition is constant (max == min), divide by this instead
# of zero: the reference code produces NaN/inf there.
ZERO_SPAN_EPS = 1e-6

# Integer tensors or numpy arrays (the engine's host keeps per-step lengths in numpy).
Ints = torch.Tensor | np.ndarray


@dataclass(frozen=True)
class Rule:
    """The numbers the rule reads: sink S, lag L, ``keep`` tokens kept per partition and KV head,
    and the value score's weight (only the selection reads it).

    ``LagKVConfig`` (``config.py``) is the validated form users give, with the ratio r
    (``keep = int(r * L)``), and builds this (``LagKVConfig.rule``). Frozen: caches key on it,
    and torch.compile traces through it without graph breaks.
    """

    sink: int
    lag: int
    keep: int
    score_v_ratio: float = 1.0  # LagKVConfig's default

    @property
    def evicted(self) -> int:
        """Tokens a compressed partition gives back: L - keep."""
        return self.lag - self.keep

    def compressed_at(self, partition: int) -> int:
        """Tokens in the cache once ``partition`` is compressed (p+1 complete): S + (p+2)L. A
        comparison with it is the scheduler's per-request, per-step check."""
        return partition_start(partition + 2, self)


# ---- scores and selection --------------------------------------------------------------------
def channel_spread_score(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """softmax over tokens of std over channels of x min-max normalised by ref's channel range.

    x, ref: ``[..., L, D]`` (partition p and partition p+1). Returns ``[..., L]`` float32.
    """
    x, ref = x.float(), ref.float()
    lo = ref.amin(dim=-2, keepdim=True)
    span = ref.amax(dim=-2, keepdim=True) - lo
    span = torch.where(span == 0, torch.full_like(span, ZERO_SPAN_EPS), span)
    return torch.softmax(unbiased_std((x - lo) / span), dim=-1)


def unbiased_std(z: torch.Tensor) -> torch.Tensor:
    """``z.std(dim=-1)`` written out: torch's std kernel is ~3x slower at head_dim-sized rows on
    CPU, and the engine scores every completed partition of every layer with it."""
    centred = z - z.mean(dim=-1, keepdim=True)
    return (centred * centred).sum(dim=-1).div(z.shape[-1] - 1).sqrt()


def partition_score(
    keys: torch.Tensor,
    values: torch.Tensor,
    ref_keys: torch.Tensor,
    ref_values: torch.Tensor,
    score_v_ratio: float = 1.0,
) -> torch.Tensor:
    """LagKV score of one partition's tokens against the next partition: ``[..., L]`` float32."""
    return channel_spread_score(keys, ref_keys) + score_v_ratio * channel_spread_score(
        values, ref_values
    )


def top_keep_sorted(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores along the last dim, ties to the lower index,
    returned in increasing order (sorted order makes compaction race-free)."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :keep]
    return order.sort(dim=-1).values


def select_partition(
    keys: torch.Tensor,
    values: torch.Tensor,
    ref_keys: torch.Tensor,
    ref_values: torch.Tensor,
    keep: int,
    score_v_ratio: float = 1.0,
) -> torch.Tensor:
    """Kept token indices (0..L-1, increasing) of one partition: ``[..., keep]`` int64."""
    return top_keep_sorted(partition_score(keys, values, ref_keys, ref_values, score_v_ratio), keep)


# ---- partition bookkeeping ---------------------------------------------------------------------
def partition_of(positions: torch.Tensor, rule: Rule) -> torch.Tensor:
    """w(t) = (t - S) // L; negative for sink positions."""
    return torch.div(positions - rule.sink, rule.lag, rounding_mode="floor")


def partition_start(partition: int | Ints, rule: Rule) -> int | Ints:
    """First position of a partition, S + pL (an int, or each of an integer tensor or array)."""
    return rule.sink + partition * rule.lag


def compressed_partitions(num_tokens: int, rule: Rule) -> int:
    """How many partitions are compressed once ``num_tokens`` tokens are in the cache:
    partition p is compressed when p+1 completes, i.e. at ``S + (p+2)L`` tokens."""
    return max(0, (num_tokens - rule.sink) // rule.lag - 1)


def compressed_partitions_each(num_tokens: Ints, rule: Rule) -> Ints:
    """:func:`compressed_partitions` of every length in an integer tensor or numpy array."""
    return ((num_tokens - (rule.sink + rule.lag)) // rule.lag).clip(0)  # (n-S)//L - 1, floored


def resident_tokens(num_tokens: int, rule: Rule) -> int:
    """KV entries held per layer and KV head after ``num_tokens`` tokens (at most S + r·n + 2L)."""
    return num_tokens - compressed_partitions(num_tokens, rule) * rule.evicted


def resident_tokens_each(num_tokens: Ints, rule: Rule) -> Ints:
    """:func:`resident_tokens` of every length in an integer tensor or numpy array."""
    return num_tokens - compressed_partitions_each(num_tokens, rule) * rule.evicted


def select_all(keys: torch.Tensor, values: torch.Tensor, rule: Rule) -> torch.Tensor:
    """Kept absolute positions of every compressed partition of a whole sequence.

    keys, values: ``[..., n, D]``. Returns ``[..., P, keep]`` int64, P = compressed_partitions(n),
    partitions in order, positions increasing inside each.
    """
    n = keys.shape[-2]
    num_parts = compressed_partitions(n, rule)
    lead = keys.shape[:-2]
    if num_parts == 0:
        return torch.empty(*lead, 0, rule.keep, dtype=torch.long, device=keys.device)
    end = partition_start(num_parts + 1, rule)  # partitions 0..P, P being the last one's reference
    k = keys[..., rule.sink : end, :].unflatten(-2, (num_parts + 1, rule.lag))
    v = values[..., rule.sink : end, :].unflatten(-2, (num_parts + 1, rule.lag))
    parts = (k[..., :-1, :, :], v[..., :-1, :, :])  # partitions 0..P-1
    refs = (k[..., 1:, :, :], v[..., 1:, :, :])  # and their references, 1..P
    kept = select_partition(*parts, *refs, rule.keep, rule.score_v_ratio)
    starts = partition_start(torch.arange(num_parts, device=keys.device), rule)
    return kept + starts[:, None]


# ---- the visibility rule -------------------------------------------------------------------------
def raw_key_visible(q_pos: torch.Tensor, k_pos: torch.Tensor, rule: Rule) -> torch.Tensor:
    """Keys seen whatever was selected: causal, and sink, previous or current partition
    (everything while w(t) <= 1). Broadcasts."""
    q_part, k_part = partition_of(q_pos, rule), partition_of(k_pos, rule)
    return (k_pos <= q_pos) & ((k_pos < rule.sink) | (k_part >= q_part - 1) | (q_part <= 1))


def gathered_key_visible(
    q_pos: torch.Tensor, gathered_idx: torch.Tensor, rule: Rule
) -> torch.Tensor:
    """In the static formulation (kept K/V appended after the raw sequence, partitions in order),
    gathered key j belongs to partition j // keep and is seen by queries of partition >= that+2."""
    return gathered_idx // rule.keep <= partition_of(q_pos, rule) - 2


def visibility_mask(
    num_keys: int, kept_positions: torch.Tensor, rule: Rule, query_start: int = 0
) -> torch.Tensor:
    """Which keys each query sees: bool ``[..., num_keys - query_start, num_keys]``.

    kept_positions: ``[..., P, keep]`` from :func:`select_all` on the same sequence or a longer
    one (at least the partitions older than the last query's previous one). Queries are positions
    ``query_start .. num_keys-1``, so decode steps can ask for their last rows only.
    """
    device = kept_positions.device
    q_pos = torch.arange(query_start, num_keys, device=device)[:, None]
    k_pos = torch.arange(num_keys, device=device)[None, :]
    lead = kept_positions.shape[:-2]
    # Kept positions at or past num_keys (partitions no query here can see yet) are ignored.
    flat = kept_positions.flatten(-2)
    hits = torch.zeros(*lead, num_keys, dtype=torch.int32, device=device)
    hits.scatter_add_(-1, flat.clamp(max=num_keys - 1), (flat < num_keys).int())
    is_kept = hits > 0
    old_enough = partition_of(k_pos, rule) <= partition_of(q_pos, rule) - 2
    return raw_key_visible(q_pos, k_pos, rule) | (is_kept[..., None, :] & old_enough)


# ---- chunking ----------------------------------------------------------------------------------
def chunk_end_limit(start: int, rule: Rule) -> int:
    """Furthest end (exclusive) of a prefill chunk starting at ``start`` whose tokens all see the
    same compressed history: up to ``S + 2L`` at first, then up to the next partition boundary.
    Such a chunk is plain causal attention over the compacted cache, i.e. exactly the rule."""
    first = partition_start(2, rule)
    if start < first:
        return first
    return partition_start((start - rule.sink) // rule.lag + 1, rule)
