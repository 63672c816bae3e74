"""LagKV in plain torch: the reference every fast path (engine, kernels, trainer) is tested against.

Contract: ``docs/lagkv.md``. Positions ``t < S`` are the sink; ``t >= S`` belong to
partition ``w(t) = (t - S) // L``. Partition p is scored against partition p+1 (its "lag"
reference) once p+1 is complete, keeps ``keep = int(r * L)`` tokens per KV head, and is never
re-scored. A query at t sees: the sink, the kept tokens of partitions ``<= w(t) - 2``, the
whole partition ``w(t) - 1`` and its own partition causally.

Tensors are laid out ``[..., tokens, head_dim]`` with any leading dims (batch, KV head).
"""

from __future__ import annotations

import torch

from lrsa_serve.config import LagKVConfig

# Where a channel of the reference partition is constant (max == min), divide by this instead
# of zero: the reference code produces NaN/inf there.
ZERO_SPAN_EPS = 1e-6


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
def partition_of(positions: torch.Tensor, cfg: LagKVConfig) -> torch.Tensor:
    """w(t) = (t - S) // L; negative for sink positions."""
    return torch.div(positions - cfg.sink, cfg.lag, rounding_mode="floor")


def compressed_partitions(num_tokens: int, cfg: LagKVConfig) -> int:
    """How many partitions are compressed once ``num_tokens`` tokens are in the cache:
    partition p is compressed when p+1 completes, i.e. at ``S + (p+2)L`` tokens."""
    return max(0, (num_tokens - cfg.sink) // cfg.lag - 1)


def resident_tokens(num_tokens: int, cfg: LagKVConfig) -> int:
    """KV entries held per layer and KV head after ``num_tokens`` tokens (at most S + r·n + 2L)."""
    return num_tokens - compressed_partitions(num_tokens, cfg) * (cfg.lag - cfg.keep)


def select_all(keys: torch.Tensor, values: torch.Tensor, cfg: LagKVConfig) -> torch.Tensor:
    """Kept absolute positions of every compressed partition of a whole sequence.

    keys, values: ``[..., n, D]``. Returns ``[..., P, keep]`` int64, P = compressed_partitions(n),
    partitions in order, positions increasing inside each.
    """
    n = keys.shape[-2]
    num_parts = compressed_partitions(n, cfg)
    lead = keys.shape[:-2]
    if num_parts == 0:
        return torch.empty(*lead, 0, cfg.keep, dtype=torch.long, device=keys.device)
    span = (num_parts + 1) * cfg.lag  # partitions 0..P, P being the last one's reference
    k = keys[..., cfg.sink : cfg.sink + span, :].unflatten(-2, (num_parts + 1, cfg.lag))
    v = values[..., cfg.sink : cfg.sink + span, :].unflatten(-2, (num_parts + 1, cfg.lag))
    kept = select_partition(
        k[..., :-1, :, :],
        v[..., :-1, :, :],
        k[..., 1:, :, :],
        v[..., 1:, :, :],
        cfg.keep,
        cfg.score_v_ratio,
    )
    starts = cfg.sink + cfg.lag * torch.arange(num_parts, device=keys.device)
    return kept + starts[:, None]


# ---- the visibility rule -------------------------------------------------------------------------
def raw_key_visible(q_pos: torch.Tensor, k_pos: torch.Tensor, cfg: LagKVConfig) -> torch.Tensor:
    """Keys seen whatever was selected: causal, and sink, previous or current partition
    (everything while w(t) <= 1). Broadcasts."""
    q_part, k_part = partition_of(q_pos, cfg), partition_of(k_pos, cfg)
    return (k_pos <= q_pos) & ((k_pos < cfg.sink) | (k_part >= q_part - 1) | (q_part <= 1))


def gathered_key_visible(
    q_pos: torch.Tensor, gathered_idx: torch.Tensor, cfg: LagKVConfig
) -> torch.Tensor:
    """In the static formulation (kept K/V appended after the raw sequence, partitions in order),
    gathered key j belongs to partition j // keep and is seen by queries of partition >= that+2."""
    return gathered_idx // cfg.keep <= partition_of(q_pos, cfg) - 2


def visibility_mask(
    num_keys: int,
    kept_positions: torch.Tensor,
    cfg: LagKVConfig,
    query_start: int = 0,
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
    old_enough = partition_of(k_pos, cfg) <= partition_of(q_pos, cfg) - 2
    return raw_key_visible(q_pos, k_pos, cfg) | (is_kept[..., None, :] & old_enough)


# ---- chunking ----------------------------------------------------------------------------------
def chunk_end_limit(start: int, cfg: LagKVConfig) -> int:
    """Furthest end (exclusive) of a prefill chunk starting at ``start`` whose tokens all see the
    same compressed history: up to ``S + 2L`` at first, then up to the next partition boundary.
    Such a chunk is plain causal attention over the compacted cache, i.e. exactly the rule."""
    first = cfg.sink + 2 * cfg.lag
    if start < first:
        return first
    return cfg.sink + ((start - cfg.sink) // cfg.lag + 1) * cfg.lag
