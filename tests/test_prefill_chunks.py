"""The LagKV scheduler's prefill chunks (``engine/scheduler.py``): with a roomy pool they span
partitions and fill prefill steps as vanilla vLLM does, within the step's scratch; while the
pool binds, only as far as the blocks it can spare beyond what admitted requests still need.
Replayed with vLLM's own schedulers and KV
managers, without a model (``scheduler_steps``)."""

from __future__ import annotations

import json

import pytest

from benchmarks import scheduler_steps
from benchmarks.gpu_serving import WORKLOADS, sized
from lrsa_serve import lagkv
from lrsa_serve.engine import scheduler
from lrsa_serve.engine.chunk_items import pre_partitions

# 64 x 3,968-token prompts + 128 new, S32 L256, an 8,192-token step budget
WORKLOAD = ["--workloads", "small-e2e", "--scale", "0.5", "--sequences", "64",
            "--max-num-batched-tokens", "8192"]  # fmt: skip


def replay(tmp_path, *extra: str) -> dict:
    out = tmp_path / "steps.json"
    assert scheduler_steps.main([*WORKLOAD, *extra, "--json", str(out)]) == 0
    return json.loads(out.read_text())["results"]["small-e2e"]


def one_partition(self, start: int, wanted: int) -> int:
    return min(wanted, lagkv.chunk_end_limit(start, self.lagkv) - start)


def test_chunks_span_partitions_and_fill_steps_as_vanilla(tmp_path, monkeypatch):
    result = replay(tmp_path)
    # 64 x 3,968 tokens in 8,192-token steps: 31 full steps and a last one, in both engines
    assert result["vanilla"]["prefill_steps"] == result["lagkv"]["prefill_steps"] == 32
    assert result["lagkv"]["steps"] == result["vanilla"]["steps"]
    # One partition per request and step instead: a tail of part-empty steps.
    monkeypatch.setattr(scheduler.LagKVSchedulingMixin, "chunk_length", one_partition)
    assert replay(tmp_path)["lagkv"]["prefill_steps"] == 40


@pytest.mark.parametrize("pool_tokens", [40_000, 70_000])
def test_a_tight_pool_spans_partitions_only_with_blocks_it_can_spare(
    tmp_path, monkeypatch, pool_tokens
):
    # The pool holds ~25 / ~45 compressed peaks: the requests run in waves. A chunk past one
    # partition takes its extra raw blocks only from what the admitted requests do not need.
    result = replay(tmp_path, "--pool-tokens", str(pool_tokens))["lagkv"]
    monkeypatch.setattr(scheduler.LagKVSchedulingMixin, "chunk_length", one_partition)
    single = replay(tmp_path, "--pool-tokens", str(pool_tokens))["lagkv"]
    assert result["preemptions"] == single["preemptions"] == 0
    # 62 vs 115 and 38 vs 61 prefill steps, 398 vs 440 and 268 vs 286 steps when written
    assert result["prefill_steps"] < 0.7 * single["prefill_steps"]
    assert result["steps"] < single["steps"]


def replay_steps(*extra: str) -> tuple[list[tuple[int, int]], object]:
    """The LagKV scheduler's steps, replayed: (requests, partitions compacted before attention)
    per step, and the scheduler."""
    args = scheduler_steps.parse_args([*WORKLOAD, *extra])
    w = sized(WORKLOADS["small-e2e"], args.scale, args.sequences)
    sched = scheduler_steps.make_scheduler(args, w, "lagkv")
    scheduler_steps.add_requests(sched, w)
    schedule, per_step = sched.schedule, []

    def counted():
        out = schedule()
        # schedule() has counted the step's tokens as computed already
        per_step.append((len(out.num_scheduled_tokens), sum(
            pre_partitions(sched.requests[r].num_computed_tokens - n,
                           sched.requests[r].num_computed_tokens, sched.lagkv)
            for r, n in out.num_scheduled_tokens.items()
        )))  # fmt: skip
        return out

    sched.schedule = counted
    while sched.has_requests():
        scheduler_steps.step(sched, scheduler_steps.Steps())
    return per_step, sched


def test_a_step_compacts_no_more_partitions_before_attention_than_its_scratch():
    per_step, sched = replay_steps("--max-num-batched-tokens", "2048")
    pre = [p for _, p in per_step]
    assert max(pre) == sched._scratch == 2048 // 256
    assert sum(p > 0 for p in pre) > 10


def test_a_step_attends_no_more_items_than_max_num_seqs():
    # FlashAttention 3's per-batch buffers hold max_num_seqs items: requests + partitions
    # compacted before attention. Early requests decode while later ones prefill across partitions.
    per_step, _ = replay_steps("--max-num-seqs", "72")
    assert max(requests + pre for requests, pre in per_step) == 72  # full, never over
