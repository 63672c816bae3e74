"""LagKV with several workers on one CPU host: pipeline parallelism on the default model, tensor
parallelism on a tiny model whose head counts divide by two, and the core binding that lets both
start on a host with a single NUMA node."""

from __future__ import annotations

import os
import re
import time

import httpx
import pytest
from engine_helpers import engine_generate, passkey_prompts, scheduler_of

from lrsa_serve.engine.cpu_workers import BIND_VARIABLE, bind_local_ranks, core_groups
from lrsa_serve.errors import UserError

pytestmark = pytest.mark.engine

LAGKV = dict(sink=32, lag=128, ratio=0.25)


def test_core_groups_split_contiguously():
    assert core_groups([3, 0, 1, 2], 2) == [[0, 1], [2, 3]]
    assert core_groups(range(5), 2) == [[0, 1, 2], [3, 4]]
    assert core_groups([7], 1) == [[7]]
    with pytest.raises(UserError, match="2 CPU workers need at least 2 cores") as error:
        core_groups([0], 2)
    assert "\n" not in str(error.value)


def test_binding_is_set_once_and_never_over_the_users():
    cores = sorted(os.sched_getaffinity(0))
    environ: dict[str, str] = {}
    assert bind_local_ranks(1, environ) is None and environ == {}
    if len(cores) >= 2:
        groups = bind_local_ranks(2, environ)
        assert groups == core_groups(cores, 2)
        assert environ[BIND_VARIABLE] == "|".join(",".join(map(str, g)) for g in groups)
    mine = {BIND_VARIABLE: "nobind"}
    assert bind_local_ranks(2, mine) is None and mine == {BIND_VARIABLE: "nobind"}
    with pytest.raises(UserError):
        bind_local_ranks(len(cores) + 1, {})


# vLLM's CPU runner needs its compile warm-up under pipeline parallelism (``cpu_workers``); the
# eager backend keeps that warm-up short (no inductor build).
COMPILED = {"compilation_config": {"backend": "eager"}}
EAGER = {"enforce_eager": True}


def parallel_engine(model: str, **kwargs):
    from lrsa_serve.engine import make_llm

    base = dict(dtype="float32", max_model_len=4096, seed=0)
    return make_llm(model, **(base | kwargs))


def shut(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


def start_method(worker) -> str | None:
    """How multiprocessing started this worker's process (``spawn``: a fresh interpreter)."""
    import multiprocessing

    return multiprocessing.get_start_method(allow_none=True)


def pool_is_idle(llm) -> bool:
    manager = scheduler_of(llm).kv_cache_manager
    pool = manager.block_pool
    return not any(m.req_to_blocks for m in manager.coordinator.single_type_managers) and (
        pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # all but the null block
    )


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return passkey_prompts(tokenizer)


def test_two_pipeline_stages_equal_one_worker(engines, default_model, prompts):
    engines.close()  # one engine at a time on 2 cores
    runs = {}
    for stages in (1, 2):
        llm = parallel_engine(default_model, lagkv=LAGKV, pipeline_parallel_size=stages, **COMPILED)
        try:
            runs[stages] = engine_generate(llm, prompts, 32)
            assert pool_is_idle(llm)
        finally:
            shut(llm)
    assert runs[2] == runs[1]


def test_a_worker_in_its_own_process_equals_one_in_the_engine_core(engines, default_model, prompts):
    """The multiprocess executor with one worker (`--distributed-executor-backend mp`): the KV
    spec, the plan and the compaction cross the process boundary, and the tokens are the
    in-process executor's. vLLM's CPU platform spawns the worker, as its CUDA platform does
    wherever the parent has initialised CUDA: a fresh interpreter that unpickles the engine
    config before it loads any plugin."""
    engines.close()
    runs = {}
    for executor in ("uni", "mp"):
        llm = parallel_engine(
            default_model, lagkv=LAGKV, distributed_executor_backend=executor, **EAGER
        )
        try:
            assert (
                llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend == executor
            )
            if executor == "mp":
                assert llm.collective_rpc(start_method) == ["spawn"]
            runs[executor] = engine_generate(llm, prompts, 32)
            assert pool_is_idle(llm)
        finally:
            shut(llm)
    assert runs["mp"] == runs["uni"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """4 query / 2 KV heads of 64 (vLLM's CPU attention takes head sizes from 32 up; both counts
    divide by 2), random weights large enough to give peaked logits, a 400-token vocabulary."""
    from benchmarks.random_models import save_tiny_model

    folder = tmp_path_factory.mktemp("tiny-tp")
    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    return str(save_tiny_model(folder, "llama", seed=1, initializer_range=0.2, **shape))


def test_two_tensor_parallel_ranks_follow_stock(engines, tiny_model):
    """TP=2 against TP=1 under LagKV, at every prompt where stock vLLM's own TP=2 equals its
    TP=1 (the all-reduce changes summation order; that noise is not LagKV's to answer for)."""
    import random

    engines.close()
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 400) for _ in range(n)] for n in (700, 1100, 1500)]
    runs = {}
    for name, lagkv in (("stock", None), ("lagkv", LAGKV)):
        for tp in (1, 2):
            llm = parallel_engine(tiny_model, lagkv=lagkv, tensor_parallel_size=tp, **EAGER)
            try:
                runs[name, tp] = engine_generate(llm, prompts, 24)
                assert pool_is_idle(llm)
            finally:
                shut(llm)
    stable = [i for i in range(len(prompts)) if runs["stock", 1][i] == runs["stock", 2][i]]
    assert stable, "stock vLLM's TP=2 differs from TP=1 on every prompt: nothing to compare"
    for i in stable:
        assert runs["lagkv", 2][i] == runs["lagkv", 1][i], i
    # LagKV changed what the model saw: the comparison is not stock against itself.
    assert any(runs["lagkv", 1][i] != runs["stock", 1][i] for i in range(len(prompts)))


def test_server_with_two_stages_says_its_cores_and_counts_once(engines, tokenizer, monkeypatch):
    """`lrsa serve --pipeline-parallel-size 2` on this host starts without a hand-set binding,
    logs each rank's cores, answers, counts each compaction once (not once per stage) and
    returns to idle."""
    from server_helpers import LiveServer

    from lrsa_serve import lagkv
    from lrsa_serve.config import LagKVConfig

    engines.close()
    monkeypatch.delenv(BIND_VARIABLE, raising=False)
    prompt = passkey_prompts(tokenizer)[0]
    args = ["--pipeline-parallel-size", "2", "--sink", "32", "--lag", "128", "--ratio", "0.25",
            "--dtype", "float32", "--compilation-config", '{"backend": "eager"}',
            "--max-model-len", "4096"]  # fmt: skip
    with LiveServer(*args) as server:
        assert re.search(
            r"rank 0 on cores \[[\d, ]+\], rank 1 on cores \[[\d, ]+\]", server.tail(400)
        )
        before = server.metrics()
        body = {"model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 8,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=600)
        assert response.status_code == 200, response.text
        deadline = time.time() + 60
        while time.time() < deadline and server.metric("vllm:num_requests_running"):
            time.sleep(0.5)
        after = server.metrics()
        assert server.metric("vllm:kv_cache_usage_perc") == 0
    rule = LagKVConfig(**LAGKV).rule
    # The last sampled token is never fed back: n + m - 1 tokens went through the cache.
    compressed = lagkv.compressed_partitions(len(prompt) + 8 - 1, rule)
    assert compressed >= 5
    delta = {k: after[k] - before.get(k, 0.0) for k in after if k.startswith("lagkv_")}
    assert delta["lagkv_compressed_partitions_total"] == compressed
    assert delta["lagkv_evicted_tokens_total"] == compressed * rule.evicted
    # Each stage times its own 15 of the 30 layers: one observation per layer and compaction.
    assert delta["lagkv_compaction_seconds_count"] == compressed * 30
    assert after["lagkv_resident_kv_tokens"] == 0


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--tensor-parallel-size", "2"], "must be divisible by tensor parallel size (2)"),
        (["--pipeline-parallel-size", str(len(os.sched_getaffinity(0)) + 1)], "need at least"),
        (["--pipeline-parallel-size", "2", "--enforce-eager"], "drop --enforce-eager"),
    ],
    ids=["heads-not-divisible", "more-workers-than-cores", "stages-without-warm-up"],
)
def test_bad_parallel_sizes_fail_at_start_in_one_line(flags, message, monkeypatch):
    import subprocess
    import sys

    from lrsa_serve.pipeline.processes import free_port

    monkeypatch.delenv(BIND_VARIABLE, raising=False)
    cmd = [sys.executable, "-m", "lrsa_serve.serving.cli", *flags, "--dtype", "float32",
           "--max-model-len", "4096", "--port", str(free_port())]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("lrsa serve: error")]
    assert len(errors) == 1 and message in errors[0], done.stderr[-2000:]
