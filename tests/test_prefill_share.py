"""The LagKV scheduler's prefill share (``engine/scheduler.py``): with a roomy pool it fills
prefill steps as vanilla vLLM does; once the pool refuses a request, first come, first served.
Replayed with vLLM's own schedulers and KV managers, without a model (``scheduler_steps``)."""

from __future__ import annotations

import json

import pytest

from benchmarks import scheduler_steps
from lrsa_serve.engine import scheduler

# 64 x 3,968-token prompts + 128 new, S32 L256, an 8,192-token step budget
WORKLOAD = ["--workloads", "small-e2e", "--scale", "0.5", "--sequences", "64",
            "--max-num-batched-tokens", "8192"]  # fmt: skip


def replay(tmp_path, *extra: str) -> dict:
    out = tmp_path / "steps.json"
    assert scheduler_steps.main([*WORKLOAD, *extra, "--json", str(out)]) == 0
    return json.loads(out.read_text())["results"]["small-e2e"]


SHARE = scheduler.LagKVSchedulingMixin.prefill_share


def first_come_first_served(self) -> int:
    return scheduler.UNCAPPED


def never_pool_bound(self) -> int:
    self._pool_bound = False
    return SHARE(self)


def test_the_share_fills_prefill_steps_as_vanilla_does(tmp_path, monkeypatch):
    shared = replay(tmp_path)
    # 64 x 3,968 tokens in 8,192-token steps: 31 full steps and a last one, in both engines
    assert shared["vanilla"]["prefill_steps"] == shared["lagkv"]["prefill_steps"] == 32
    assert shared["lagkv"]["steps"] == shared["vanilla"]["steps"]
    # Without it, one partition per request and step leaves a tail of part-empty steps.
    monkeypatch.setattr(scheduler.LagKVSchedulingMixin, "prefill_share", first_come_first_served)
    assert replay(tmp_path)["lagkv"]["prefill_steps"] == 40


@pytest.mark.parametrize("pool_tokens", [40_000, 70_000])
def test_a_tight_pool_turns_the_share_off(tmp_path, monkeypatch, pool_tokens):
    # The pool holds ~25 / ~45 compressed peaks: the requests run in waves, and the earliest
    # requests must finish first to free their blocks. Sharing regardless costs steps.
    shared = replay(tmp_path, "--pool-tokens", str(pool_tokens))["lagkv"]
    monkeypatch.setattr(scheduler.LagKVSchedulingMixin, "prefill_share", first_come_first_served)
    fcfs = replay(tmp_path, "--pool-tokens", str(pool_tokens))["lagkv"]
    monkeypatch.setattr(scheduler.LagKVSchedulingMixin, "prefill_share", never_pool_bound)
    always = replay(tmp_path, "--pool-tokens", str(pool_tokens))["lagkv"]
    assert shared["preemptions"] == fcfs["preemptions"] == always["preemptions"] == 0
    assert shared["steps"] <= fcfs["steps"] + 1 < always["steps"]
    assert shared["prefill_steps"] < fcfs["prefill_steps"]
