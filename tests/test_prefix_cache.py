"""Prefix caching under LagKV: the hit-length rule, the names of kept blocks, and a real engine
whose cache hits give the same greedy tokens as computing everything (float32, default model)."""

from __future__ import annotations

import hashlib
import inspect
import random

import pytest
from engine_helpers import passkey_prompts, reference_generate, scheduler_of, step_through

from lrsa_serve import lagkv
from lrsa_serve.config import LagKVConfig
from lrsa_serve.engine.api import default_block_size
from lrsa_serve.engine.kv_spec import LagKVManager
from lrsa_serve.engine.layout import BlockGeometry
from lrsa_serve.engine.prefix_cache import HitRule, kept_block_hash, kept_block_hashes

SETTINGS = LagKVConfig(sink=32, lag=128, ratio=0.25)
BLOCK = 32  # of the hit-rule and naming tests; the engine's own is ENGINE_BLOCK


def brute_force_hit(max_blocks: int, rule: HitRule, raw: set[int], kept: set[int]) -> int:
    """The rule as stated: the longest hit whose state is complete. A hit of m blocks with
    c = compressed(m) needs the kept blocks of partitions < c and raw blocks for every other
    column below m that is not a freed tail."""
    g = rule.geometry
    for m in range(max_blocks, -1, -1):
        c = rule.compressed(m)
        compacted = range(g.sink_blocks, g.sink_blocks + c * g.part_blocks)
        raw_needed = [col for col in range(m) if col not in compacted]
        if all(col in raw for col in raw_needed) and all(p in kept for p in range(c)):
            return m
    raise AssertionError("m = 0 always qualifies")


@pytest.mark.parametrize("seed", range(300))
def test_hit_length_rule_matches_its_statement(seed):
    rng = random.Random(seed)
    block = rng.choice([1, 2])
    part = rng.randint(1, 4)
    rule = lagkv.Rule(
        sink=block * rng.randint(0, 2), lag=block * part, keep=block * rng.randint(0, part)
    )
    hits = HitRule(BlockGeometry(rule, block))
    columns = rng.randint(0, 40)
    # Mostly-present caches, so that long hits happen.
    raw = {col for col in range(columns) if rng.random() < 0.9}
    kept = {p for p in range(columns) if rng.random() < 0.85}
    got = hits.longest(columns, raw.__contains__, kept.__contains__)
    assert got == brute_force_hit(columns, hits, raw, kept)


def test_kept_block_names_depend_on_the_reference_rule_and_place():
    geometry = BlockGeometry(SETTINGS.rule, BLOCK)
    name = kept_block_hash(b"reference", 3, 0, geometry)
    assert name == kept_block_hash(b"reference", 3, 0, geometry)
    others = [
        kept_block_hash(b"other-reference", 3, 0, geometry),
        kept_block_hash(b"reference", 4, 0, geometry),
        kept_block_hash(b"reference", 3, 1, geometry),
        kept_block_hash(b"reference", 3, 0, BlockGeometry(SETTINGS.rule, 16)),
    ]
    for changed in ({"ratio": 0.5}, {"lag": 256}, {"sink": 64}, {"score_v_ratio": 0.5}):
        rule = LagKVConfig(**(SETTINGS.model_dump() | changed)).rule
        others.append(kept_block_hash(b"reference", 3, 0, BlockGeometry(rule, BLOCK)))
    assert name not in others and len(set(others)) == len(others)
    # The name's bytes, pinned: a cache's names must not drift between versions of the code.
    assert name == hashlib.sha256(b"reference" + b"lagkv:32:128:32:1.0:32:3:0").digest()


def test_a_partitions_kept_names_are_each_blocks_name():
    geometry = BlockGeometry(LagKVConfig(sink=32, lag=256, ratio=0.5).rule, BLOCK)  # 4 blocks
    hashes = [hashlib.sha256(str(i).encode()).digest() for i in range(64)]
    for partition in (0, 1, 3):
        reference = hashes[geometry.partition_columns(partition + 1).stop - 1]
        names = kept_block_hashes(hashes, partition, geometry)
        assert len(names) == geometry.keep_blocks == 4
        assert names == [kept_block_hash(reference, partition, i, geometry) for i in range(4)]


@pytest.mark.parametrize(
    "hook",
    ["cache_blocks", "allocate_new_blocks", "get_num_blocks_to_allocate", "remove_skipped_blocks"],
)
def test_per_step_hooks_take_vllms_exact_parameters(hook):
    # They run for every request at every step, so they spell vLLM's parameters out rather than
    # forward *args/**kwargs; a vLLM whose parameters differ must fail here, not mid-serving.
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    def shape(fn) -> list[tuple]:
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert shape(getattr(LagKVManager, hook)) == shape(getattr(FullAttentionManager, hook))


# ---- a real engine ---------------------------------------------------------------------------

N_TOKENS = 16
# The engine's KV block (32 tokens on a CPU, 16 on a GPU): hits are whole blocks of it.
ENGINE_BLOCK = default_block_size()
POOL_TOKENS = 48 * 32  # the pool-pressure test's pool


def whole_blocks(tokens: int) -> int:
    """The longest hit ``tokens`` cached tokens can give: whole engine blocks."""
    return tokens // ENGINE_BLOCK * ENGINE_BLOCK


@pytest.fixture(scope="module")
def base(tokenizer) -> list[int]:
    """The first conversation: ~1.9K tokens, 13 partitions compacted once it has decoded."""
    return passkey_prompts(tokenizer)[1]


@pytest.fixture(scope="module")
def diverging(tokenizer, base) -> dict[str, tuple[int, list[int]]]:
    """Prompts that share ``base``'s first d tokens, then continue with other text."""
    other = passkey_prompts(tokenizer)[0][200:520]
    s, lag = SETTINGS.sink, SETTINGS.lag
    points = {
        "in the sink": 20,
        "at the sink's end": s,
        "inside the first two partitions": s + lag + 50,
        "on the first compactable boundary": s + 2 * lag,
        "inside a compacted partition": s + 5 * lag + 50,
        "on a partition boundary": s + 6 * lag,
        "inside the last compacted partition's reference": s + 13 * lag + 54,
        "inside the raw window": s + 14 * lag + 26,
    }
    prompts = {}
    for name, d in points.items():
        tail = other if other[0] != base[d] else other[1:]
        prompts[name] = (d, base[:d] + tail)
    return prompts


def generate(llm, prompts: list[list[int]], salt: str | None = None):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    if salt is not None:
        for one in inputs:
            one["cache_salt"] = salt
    outs = llm.generate(inputs, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [o.num_cached_tokens for o in outs]


@pytest.fixture(scope="module")
def longest(tokenizer) -> list[int]:
    return passkey_prompts(tokenizer)[2]  # ~2.9K tokens, unrelated to base


@pytest.fixture(scope="module")
def uncached(engines, base, longest, diverging) -> dict[str, list[int]]:
    """Greedy tokens of every prompt with prefix caching off (each computed from scratch)."""
    llm = engines.get(lagkv=SETTINGS.model_dump(), enable_prefix_caching=False)
    names = list(diverging)
    outputs, cached = generate(llm, [base, longest] + [diverging[n][1] for n in names])
    assert not any(cached)
    return dict(zip(["base", "longest", *names], outputs, strict=True))


def caching_engine(engines, **kwargs):
    llm = engines.get(lagkv=SETTINGS.model_dump(), enable_prefix_caching=True, **kwargs)
    llm.reset_prefix_cache()
    return llm


def assert_pool_idle(llm) -> None:
    scheduler = scheduler_of(llm)
    pool = scheduler.kv_cache_manager.block_pool
    (manager,) = scheduler.lagkv_managers()
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # all but the null block
    assert not (manager.req_to_blocks or manager.renamed_partitions or manager.kept_names)
    assert not (manager.raw_copies or manager.processed_tokens or manager.freed_partitions)


@pytest.mark.engine
def test_hits_equal_computing_everything(engines, base, diverging, uncached):
    llm = caching_engine(engines)
    assert generate(llm, [base])[0] == [uncached["base"]]
    for name, (d, prompt) in diverging.items():
        (tokens,), (cached,) = generate(llm, [prompt])
        assert tokens == uncached[name], name
        # Everything the first conversation computed is cached: raw copies of the partitions it
        # compacted, their kept blocks, its raw window; the hit ends at d's block. But partition
        # 0 is compacted in the step that writes it (the first chunk ends at S + 2L), before any
        # copy of it could be made: a hit that needs it raw keeps only the sink.
        expected = SETTINGS.sink if d < SETTINGS.sink + 2 * SETTINGS.lag else whole_blocks(d)
        assert cached == min(expected, whole_blocks(d)), name
    assert_pool_idle(llm)


@pytest.mark.engine
def test_batched_hits_equal_computing_everything(engines, base, diverging, uncached):
    llm = caching_engine(engines)
    generate(llm, [base])
    names = list(diverging)
    outputs, cached = generate(llm, [diverging[n][1] for n in names])
    for name, tokens, hit in zip(names, outputs, cached, strict=True):
        assert tokens == uncached[name], name
        assert hit <= whole_blocks(diverging[name][0])
    # Requests of one batch share sink and kept blocks; a raw block compaction will rewrite
    # goes to one of them at a time, so some hits end a partition or two earlier.
    assert sum(cached) > 0.5 * sum(whole_blocks(d) for d, _ in diverging.values())
    assert_pool_idle(llm)


@pytest.mark.engine
def test_hits_equal_the_reference(engines, base, diverging, hf_model):
    llm = caching_engine(engines)
    generate(llm, [base])
    for name in ("inside a compacted partition", "inside the raw window"):
        d, prompt = diverging[name]
        (tokens,), (cached,) = generate(llm, [prompt])
        assert cached == whole_blocks(d)
        assert tokens == reference_generate(hf_model, prompt, N_TOKENS, SETTINGS), name


@pytest.mark.engine
def test_a_conversation_continues_from_its_cache(engines, base, uncached):
    llm = caching_engine(engines)
    (answer,), _ = generate(llm, [base])
    turn = base + answer + base[100:140]  # the answer, then a new question
    (tokens,), (cached,) = generate(llm, [turn])
    # The first turn left len(base) + N_TOKENS - 1 tokens in the cache (the last one sampled
    # is never fed back).
    assert cached == whole_blocks(len(base) + N_TOKENS - 1)
    fresh = engines.get(lagkv=SETTINGS.model_dump(), enable_prefix_caching=False)
    assert tokens == generate(fresh, [turn])[0][0]


@pytest.mark.engine
def test_cache_salt_isolates(engines, base):
    llm = caching_engine(engines)
    generate(llm, [base], salt="tenant-a")
    assert generate(llm, [base], salt="tenant-b")[1] == [0]
    assert generate(llm, [base])[1] == [0]
    assert generate(llm, [base], salt="tenant-a")[1] == [whole_blocks(len(base) - 1)]


@pytest.mark.engine
def test_pool_pressure_preemption_and_abort_leave_nothing_stale(
    engines, base, longest, diverging, uncached
):
    """A pool of 1,536 tokens: cached blocks are evicted to make room, requests are preempted
    and resumed from what is left, one is aborted; every output equals the uncached one and the
    pool ends idle."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = caching_engine(
        engines,
        num_gpu_blocks_override=POOL_TOKENS // ENGINE_BLOCK,
        max_model_len=4096,
        scheduler_reserve_full_isl=False,
    )
    names = ["inside a compacted partition", "inside the last compacted partition's reference"]
    prompts = [longest, base] + [diverging[n][1] for n in names]
    expected = [uncached["longest"], uncached["base"]] + [uncached[n] for n in names]
    preempted = 0
    for _ in range(2):  # the second round starts from what the first left in the cache
        outputs, preemptions = step_through(llm, prompts, N_TOKENS)
        assert outputs == expected
        preempted += preemptions
    assert preempted > 0, "the pool was meant to preempt"
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    engine.add_request("abort", TokensPrompt(prompt_token_ids=base), params)
    for _ in range(30):
        engine.step()
    engine.abort_request(["abort"])
    assert generate(llm, [diverging[names[1]][1]])[0] == [uncached[names[1]]]
    assert_pool_idle(llm)
