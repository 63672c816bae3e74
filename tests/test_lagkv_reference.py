"""The reference against hand-computed cases and against a simulation of the recursive cache."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrsa_serve import lagkv
from lrsa_serve.config import LagKVConfig


def test_score_matches_hand_computation():
    ref = torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0]])  # channel ranges: [0,2], [0,4]
    x = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 4.0]])
    # z = [[.5,.25],[1,0],[0,1]]; unbiased std of two values = |a-b|/sqrt(2)
    stds = [0.25 / math.sqrt(2), 1 / math.sqrt(2), 1 / math.sqrt(2)]
    total = sum(math.exp(s) for s in stds)
    expected = torch.tensor([math.exp(s) / total for s in stds])
    torch.testing.assert_close(lagkv.channel_spread_score(x, ref), expected)
    # value score weighted by score_v_ratio
    score = lagkv.partition_score(x, x * 0 + 3.0, ref, ref, score_v_ratio=0.5)
    torch.testing.assert_close(score, expected + 0.5 / 3)


def test_constant_inputs_give_finite_uniform_scores():
    const = torch.full((2, 8, 4), 7.0)
    score = lagkv.partition_score(const, const, const, const)
    assert torch.isfinite(score).all()
    torch.testing.assert_close(score, torch.full((2, 8), 2 / 8))
    # a constant reference channel next to a varying one stays finite too
    ref = torch.randn(8, 4)
    ref[:, 1] = 3.0
    assert torch.isfinite(lagkv.channel_spread_score(torch.randn(8, 4), ref)).all()


def test_scores_in_float32_whatever_the_input_dtype():
    x = torch.randn(3, 16, 8, dtype=torch.bfloat16)
    assert lagkv.channel_spread_score(x, x).dtype == torch.float32


def test_top_keep_ties_go_to_lower_position_and_come_sorted():
    score = torch.tensor([0.1, 0.5, 0.5, 0.2, 0.5, 0.0])
    assert lagkv.top_keep_sorted(score, 2).tolist() == [1, 2]
    assert lagkv.top_keep_sorted(score, 4).tolist() == [1, 2, 3, 4]
    assert lagkv.top_keep_sorted(torch.zeros(5), 3).tolist() == [0, 1, 2]


def test_compressed_at_is_where_the_count_passes_the_partition():
    rule = LagKVConfig(sink=32, lag=128, ratio=0.25).rule
    for n in range(0, 32 + 8 * 128):
        for p in range(6):
            passed = lagkv.compressed_partitions(n, rule) > p
            assert passed == (n >= rule.compressed_at(p)), (n, p)


def test_resident_tokens_formula():
    cfg = LagKVConfig(sink=32, lag=256, ratio=0.25)
    assert lagkv.resident_tokens(0, cfg.rule) == 0
    assert lagkv.resident_tokens(32 + 2 * 256 - 1, cfg.rule) == 32 + 2 * 256 - 1
    assert lagkv.resident_tokens(32 + 2 * 256, cfg.rule) == 32 + 64 + 256
    n = 32 * 1024
    assert lagkv.resident_tokens(n, cfg.rule) <= cfg.sink + cfg.ratio * n + 2 * cfg.lag
    # docs/lagkv.md's formula S + keep*(w(n)-1) + (n - S - L*(w(n)-1)); at 32K, L=1024, r=0.25 that
    # is 9728 entries, 3.37x fewer (the doc's "about 3.6x" rounds the formula loosely)
    big = LagKVConfig(sink=16, lag=1024, ratio=0.25).rule
    w = (32768 - 16) // 1024
    assert lagkv.resident_tokens(32768, big) == 16 + 256 * (w - 1) + (32768 - 16 - 1024 * (w - 1))


def simulate_cache(keys, values, cfg, chunk_sizes, align_chunks):
    """Feed a sequence through a literal cache, chunk by chunk. Within a chunk every token sees
    the cache as it was at the chunk's start plus the chunk causally; at the end of each chunk
    every partition whose successor just completed is scored on the cache's rows and compacted.
    Returns visible[t] = set of original positions token t attends to."""
    n = keys.shape[-2]
    heads = keys.shape[0]
    cache = [list() for _ in range(heads)]  # original positions held, per KV head
    visible = [[None] * n for _ in range(heads)]
    start, compressed, sizes = 0, 0, iter(chunk_sizes)
    while start < n:
        end = min(n, start + next(sizes, n))
        if align_chunks:
            end = min(end, lagkv.chunk_end_limit(start, cfg.rule))
        for h in range(heads):
            before = list(cache[h])
            for t in range(start, end):
                visible[h][t] = set(before) | set(range(start, t + 1))
            cache[h].extend(range(start, end))
        start = end
        while compressed < lagkv.compressed_partitions(start, cfg.rule):
            p0 = cfg.sink + compressed * cfg.lag
            for h in range(heads):
                part = slice(p0, p0 + cfg.lag)
                nxt = slice(p0 + cfg.lag, p0 + 2 * cfg.lag)
                kept = lagkv.select_partition(
                    keys[h, part],
                    values[h, part],
                    keys[h, nxt],
                    values[h, nxt],
                    cfg.keep,
                    cfg.score_v_ratio,
                )
                dropped = set(range(p0, p0 + cfg.lag)) - {p0 + int(i) for i in kept}
                cache[h] = [p for p in cache[h] if p not in dropped]
            compressed += 1
    return visible


@settings(max_examples=60, deadline=None)
@given(
    sink=st.integers(0, 6),
    lag=st.integers(1, 8),
    ratio=st.sampled_from([0.25, 0.5, 0.75, 1.0]),
    n=st.integers(1, 70),
    chunk_sizes=st.lists(st.integers(1, 40), min_size=1, max_size=30),
    seed=st.integers(0, 2**16),
)
def test_recursive_cache_with_aligned_chunks_equals_visibility_rule(
    sink, lag, ratio, n, chunk_sizes, seed
):
    if int(ratio * lag) < 1:
        ratio = 1.0
    cfg = LagKVConfig(sink=sink, lag=lag, ratio=ratio)
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, n, 4, generator=gen)
    values = torch.randn(2, n, 4, generator=gen)
    visible = simulate_cache(keys, values, cfg, chunk_sizes, align_chunks=True)
    mask = lagkv.visibility_mask(n, lagkv.select_all(keys, values, cfg.rule), cfg.rule)
    for h in range(2):
        for t in range(n):
            assert visible[h][t] == set(torch.nonzero(mask[h, t]).flatten().tolist()), (h, t)


def test_unaligned_chunks_break_the_rule():
    """Why the scheduler aligns chunks: one big chunk sees evicted tokens."""
    cfg = LagKVConfig(sink=2, lag=4, ratio=0.5)
    keys, values = torch.randn(1, 30, 4), torch.randn(1, 30, 4)
    visible = simulate_cache(keys, values, cfg, [30], align_chunks=False)
    mask = lagkv.visibility_mask(30, lagkv.select_all(keys, values, cfg.rule), cfg.rule)
    assert visible[0][29] != set(torch.nonzero(mask[0, 29]).flatten().tolist())


def test_visibility_rule_by_hand():
    cfg = LagKVConfig(sink=2, lag=4, ratio=0.5)  # partitions: [2,6) [6,10) [10,14) [14,18)
    kept = torch.tensor([[[3, 5], [6, 9]]])  # one head, partitions 0 and 1
    mask = lagkv.visibility_mask(16, kept, cfg.rule)[0]
    seen = lambda t: torch.nonzero(mask[t]).flatten().tolist()  # noqa: E731
    assert seen(9) == list(range(10))  # q = 1: causal
    assert seen(10) == [0, 1, 3, 5, 6, 7, 8, 9, 10]  # q = 2: sink, kept(0), partition 1, itself
    assert seen(15) == [0, 1, 3, 5, 6, 9, 10, 11, 12, 13, 14, 15]  # q = 3
    # a decode step asks for its last rows only
    assert torch.equal(lagkv.visibility_mask(16, kept, cfg.rule, query_start=15)[0, 0], mask[15])


def test_select_all_shapes_and_positions():
    cfg = LagKVConfig(sink=3, lag=5, ratio=0.4)
    keys, values = torch.randn(2, 3, 30, 8), torch.randn(2, 3, 30, 8)
    kept = lagkv.select_all(keys, values, cfg.rule)
    assert kept.shape == (2, 3, lagkv.compressed_partitions(30, cfg.rule), 2)
    for p in range(kept.shape[2]):
        lo = cfg.sink + p * cfg.lag
        assert ((kept[:, :, p] >= lo) & (kept[:, :, p] < lo + cfg.lag)).all()
    assert (kept[..., 1:] > kept[..., :-1]).all()
    assert lagkv.select_all(keys[..., :10, :], values[..., :10, :], cfg.rule).shape == (2, 3, 0, 2)
