"""The KV manager's and the scheduler's per-request, per-step fast paths decide exactly as the
full paths they skip.

vLLM calls the KV manager's hooks for every request at every step; LagKV's overrides answer the
common decode case (no block filled, nothing allocated, nothing compacted) without calling into
vLLM, and the prefix cache skips its scan of the free queue until a request has freed cached
blocks of its own. Here the real scheduler (no model: each step samples a fixed token) runs one
trace twice, once as shipped and once with every fast path bypassed, and every step's schedule,
block tables, cache names and free count must agree. The trace has chunked prefills,
compaction, decode across block and partition boundaries, prefix hits on compacted prompts and
a pool tight enough that admission waits. The block count the scheduler asks of a running
request is also asked of vLLM's own method, for several sizes, at every step.
"""

from __future__ import annotations

import random

import pytest
import torch

from lrsa_serve.config import LagKVConfig

SETTINGS = LagKVConfig(sink=32, lag=128, ratio=0.25)
BLOCK = 16


def make_scheduler(model: str, num_blocks: int):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from lrsa_serve.engine.api import lagkv_engine_kwargs
    from lrsa_serve.engine.kv_spec import LagKVAttentionSpec
    from lrsa_serve.engine.scheduler import LagKVScheduler

    kwargs = lagkv_engine_kwargs(
        model, SETTINGS, block_size=BLOCK, enable_prefix_caching=True,
        max_num_batched_tokens=1024, max_num_seqs=16, max_model_len=4096,
    )  # fmt: skip
    config = EngineArgs(**kwargs).create_engine_config()
    config.cache_config.num_gpu_blocks = num_blocks
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=3, head_size=64, dtype=torch.float32)
    group = KVCacheGroupSpec(["layer"], LagKVAttentionSpec.wrap(spec, SETTINGS))
    kv_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[group])
    return LagKVScheduler(
        vllm_config=config, kv_cache_config=kv_config, block_size=BLOCK, log_stats=True,
        structured_output_manager=StructuredOutputManager(config),
    )  # fmt: skip


def prompts() -> list[list[int]]:
    """Two waves: the second repeats prompts of the first with new endings (prefix hits)."""
    rng = random.Random(0)
    shared = [rng.randrange(1000, 30000) for _ in range(400)]
    first = []
    for i in range(8):
        own = [rng.randrange(1000, 30000) for _ in range(300 + 150 * i)]
        first.append(shared + own if i % 2 else own)
    second = [p[: len(p) - 40] + [rng.randrange(1000, 30000) for _ in range(90)] for p in first]
    return first + second


def run_trace(model: str, num_blocks: int) -> tuple[list, dict[str, int]]:
    """Every step's schedule and KV-manager state, and counts of what the trace exercised."""
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    scheduler = make_scheduler(model, num_blocks)
    (manager,) = scheduler.lagkv_managers()
    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK, sha256)
    params = SamplingParams(max_tokens=70, ignore_eos=True)
    waves = prompts()
    trace, seen = [], {"hit_tokens": 0, "freed_partitions": 0, "decode_steps": 0, "steps": 0}
    seen["kept_count_steps"] = seen["scanning_steps"] = 0
    for i, prompt in enumerate(waves[:8]):
        scheduler.add_request(Request(str(i), prompt, params, None, block_hasher=hasher))
    second_wave = waves[8:]
    while scheduler.has_requests() or second_wave:
        if not scheduler.has_requests():  # the second wave, once the first has left
            for i, prompt in enumerate(second_wave, start=8):
                scheduler.add_request(Request(str(i), prompt, params, None, block_hasher=hasher))
            second_wave = []
        out = scheduler.schedule()
        ids = list(out.num_scheduled_tokens)
        done = [not scheduler.requests[r].is_prefill_chunk for r in ids]  # its prompt is in
        seen["steps"] += 1
        seen["decode_steps"] += bool(ids) and all(n == 1 for n in out.num_scheduled_tokens.values())
        seen["hit_tokens"] += sum(r.num_computed_tokens for r in out.scheduled_new_reqs)
        seen["freed_partitions"] = max(
            seen["freed_partitions"], sum(manager.freed_partitions.values())
        )
        seen["scanning_steps"] += bool(manager.raw_history.others_freed)
        trace.append(
            (
                sorted(out.num_scheduled_tokens.items()),
                [(r.req_id, r.block_ids) for r in out.scheduled_new_reqs],
                (out.scheduled_cached_reqs.req_ids, out.scheduled_cached_reqs.new_block_ids),
                sorted(out.preempted_req_ids or ()),
                {r: [b.block_id for b in blocks] for r, blocks in manager.req_to_blocks.items()},
                dict(manager.num_cached_block),
                manager.block_pool.get_num_free_blocks(),
                [(b.block_id, b.block_hash) for b in manager.block_pool.blocks if b.block_hash],
            )
        )
        if manager._outstanding is not None:  # kept while the pool is tight: still exact
            seen["kept_count_steps"] += 1
            assert manager._outstanding == sum(
                max(peak - manager.held_blocks_now(request_id), 0)
                for request_id, peak in manager.admitted_peaks.items()
                if request_id in manager.req_to_blocks
            )
        for request in scheduler.running:  # a pure question: ask it of both, for any size
            for num_tokens in (request.num_tokens, request.num_tokens + BLOCK, 4 * BLOCK):
                args = (request.request_id, num_tokens, [], num_tokens, 0, num_tokens)
                assert manager.get_num_blocks_to_allocate(*args) == (
                    FullAttentionManager.get_num_blocks_to_allocate(manager, *args)
                )
        sampled = [[7 + len(trace) % 50] if d else [] for d in done]
        index = {r: i for i, r in enumerate(ids)}
        output = ModelRunnerOutput(req_ids=ids, req_id_to_index=index, sampled_token_ids=sampled)
        scheduler.update_from_output(out, output)
    return trace, seen


# 240 blocks: admission waits and the second wave hits its compacted prompts; 160: so tight
# that requests are admitted while the outstanding count is kept (hits mostly evicted).
@pytest.mark.parametrize("num_blocks", [240, 160])
def test_fast_paths_decide_as_the_full_paths(default_model, monkeypatch, num_blocks):
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    from lrsa_serve.engine.kv_spec import LagKVManager
    from lrsa_serve.engine.prefix_cache import RawHistory
    from lrsa_serve.engine.scheduler import LagKVSchedulingMixin

    fast, seen = run_trace(default_model, num_blocks)
    assert seen["hit_tokens"] > 0 and seen["freed_partitions"] > 0, seen
    assert seen["decode_steps"] > 20 and seen["kept_count_steps"] > 20, seen
    assert 20 < seen["scanning_steps"] < seen["steps"] - 20, seen  # history eviction both ways

    shipped = LagKVManager.get_num_blocks_to_allocate
    lookahead = LagKVSchedulingMixin._reserve_prefill_lookahead

    def count_blocks(self, *args, apply_admission_cap=False, prefill_end=0):
        if apply_admission_cap:
            return shipped(self, *args, apply_admission_cap=True, prefill_end=prefill_end)
        return FullAttentionManager.get_num_blocks_to_allocate(self, *args, prefill_end=prefill_end)

    def reserve(self, request, num_computed_tokens, num_new_tokens):
        if num_new_tokens > 1:
            return lookahead(self, request, num_computed_tokens, num_new_tokens)
        return Scheduler._reserve_prefill_lookahead(
            self, request, num_computed_tokens, num_new_tokens
        )

    monkeypatch.setattr(LagKVManager, "get_num_blocks_to_allocate", count_blocks)
    monkeypatch.setattr(LagKVManager, "allocate_new_blocks", LagKVManager.allocate_blocks)
    monkeypatch.setattr(
        LagKVManager,
        "cache_blocks",
        lambda self, request, num_tokens, retention_interval=None, *, replay_boundaries: (
            self.name_blocks(request, num_tokens, retention_interval, replay_boundaries)
        ),
    )
    monkeypatch.setattr(LagKVSchedulingMixin, "_reserve_prefill_lookahead", reserve)
    monkeypatch.setattr(RawHistory, "evict_first", RawHistory.promote)
    full, _ = run_trace(default_model, num_blocks)
    assert len(fast) == len(full)
    for step, (a, b) in enumerate(zip(fast, full, strict=True)):
        assert a == b, f"step {step} differs"


@pytest.mark.parametrize("partition", [0, 1, 7, 40])
def test_the_inlined_threshold_is_the_rules(default_model, partition):
    from lrsa_serve.engine.kv_spec import LagKVManager

    scheduler = make_scheduler(default_model, num_blocks=240)
    (manager,) = scheduler.lagkv_managers()
    assert isinstance(manager, LagKVManager)
    inlined = manager._first_compressed_at + partition * manager._lag
    assert inlined == SETTINGS.rule.compressed_at(partition)
