"""The CUDA engine against the exact HF reference: both LagKV CUDA backends, batched, compiled
with vLLM's full CUDA graphs (decode steps that compress run inside the replayed graph), under
preemption, and the pool back to idle. Run on a GPU: ``pytest -m gpu tests/test_engine_gpu.py``.
"""

from __future__ import annotations

import gc

import pytest
import torch
from engine_helpers import (
    engine_generate,
    passkey_prompts,
    reference_generate,
    scheduler_of,
    step_through,
)

from lrsa_serve.config import LagKVConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.engine,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CFG = LagKVConfig(sink=32, lag=128, ratio=0.25)
NEW_TOKENS = 160  # every request crosses at least one partition boundary while decoding


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return passkey_prompts(tokenizer)


@pytest.fixture(scope="module")
def reference(default_model, prompts) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32)
    model = model.cuda().eval()
    tokens = [reference_generate(model, p, NEW_TOKENS, CFG) for p in prompts]
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return tokens


def build(default_model, **kwargs):
    from lrsa_serve.engine import make_llm

    base = dict(max_model_len=4096, seed=0, gpu_memory_utilization=0.3)
    return make_llm(default_model, lagkv=CFG.model_dump(), **(base | kwargs))


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def backend_of(llm) -> str:
    return str(llm.llm_engine.vllm_config.attention_config.backend)


def cudagraph_mode(llm) -> str:
    return str(llm.llm_engine.vllm_config.compilation_config.cudagraph_mode)


def test_triton_float32_full_graphs_equal_the_reference(default_model, prompts, reference):
    llm = build(default_model, dtype="float32")
    try:
        assert "LAGKV_TRITON" in backend_of(llm) and "FULL" in cudagraph_mode(llm)
        batched = engine_generate(llm, prompts, NEW_TOKENS)
        alone = engine_generate(llm, [prompts[1]], NEW_TOKENS)[0]
        scheduler = scheduler_of(llm)
        pool = scheduler.kv_cache_manager.block_pool
        (manager,) = scheduler.lagkv_managers()
        assert manager.occupancy() == (0, 0)
        assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1
    finally:
        close(llm)
    assert alone == batched[1]
    assert batched == reference


def test_triton_float32_preemption_replays_the_reference(default_model, prompts, reference):
    # Eager: the graphs are the first test's subject; this one is about replay.
    llm = build(default_model, dtype="float32", num_gpu_blocks_override=96, enforce_eager=True,
                scheduler_reserve_full_isl=False)  # fmt: skip
    try:
        outputs, preemptions = step_through(llm, prompts, NEW_TOKENS)
        pool = scheduler_of(llm).kv_cache_manager.block_pool
        idle = pool.get_num_free_blocks() == pool.num_gpu_blocks - 1
    finally:
        close(llm)
    assert preemptions > 0, "the pool was meant to preempt"
    assert outputs == reference
    assert idle


def test_flash_attention_full_graphs_track_the_reference(default_model, prompts, reference):
    """FlashAttention takes bf16 only, so its greedy tokens cannot equal a float32 reference
    throughout: they follow it until bf16 rounding flips a near-tie. So where they first differ
    the reference's token must be a near-tie in the engine's own distribution (a wrong compacted
    view or block table gives it a far lower log-probability, or drops it from the top 5)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = build(default_model, dtype="bfloat16")
    try:
        assert "LAGKV_FLASH_ATTN" in backend_of(llm) and "FULL" in cudagraph_mode(llm)
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True,
                                logprobs=5)  # fmt: skip
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                            use_tqdm=False)  # fmt: skip
    finally:
        close(llm)
    for out, expected in zip(outs, reference, strict=True):
        got = list(out.outputs[0].token_ids)
        pairs = zip(got, expected, strict=True)
        first = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        if first is None:
            continue
        top = out.outputs[0].logprobs[first]
        assert expected[first] in top, (first, got[: first + 1], expected[: first + 1])
        margin = top[got[first]].logprob - top[expected[first]].logprob
        assert margin < 0.1, (first, margin)
