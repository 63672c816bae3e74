"""Helpers for engine tests: greedy generation on both sides, and the scheduler's internals."""

from __future__ import annotations

import torch


def passkey_prompts(tokenizer) -> list[list[int]]:
    """The engine tests' prompts: ~1.1K, ~1.9K and ~2.9K tokens of natural text with different
    needles, so that S32/L128 settings compress 7-21 partitions of each."""
    from lrsa_serve.synthetic_tasks import passkey, split_seed

    lengths = [(1100, 0.3), (1900, 0.6), (2900, 0.8)]
    return [
        tokenizer.encode(passkey(tokenizer, n, depth, split_seed(i, "eval")).prompt)
        for i, (n, depth) in enumerate(lengths)
    ]


def engine_generate(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def reference_generate(model, prompt: list[int], max_tokens: int, cfg=None) -> list[int]:
    """Greedy tokens of the HF model, stock attention when cfg is None, else exact LagKV."""
    from lrsa_serve.reference_attention import use_lagkv_reference

    if cfg is None:
        model.set_attn_implementation("sdpa")
    else:
        use_lagkv_reference(model, cfg)
    # A plain greedy loop: HF's min_new_tokens would mask EOS, vLLM's ignore_eos does not.
    device = next(model.parameters()).device
    tokens, past, step_input = [], None, torch.tensor([prompt], device=device)
    with torch.no_grad():
        for _ in range(max_tokens):
            # Only the last position's logits: the LM head over a whole 6K prompt (a 1.2 GB
            # float32 tensor) took 3.5x the time of the rest of the prefill on 2 cores.
            out = model(step_input, past_key_values=past, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
            step_input = torch.tensor([[tokens[-1]]], device=device)
    return tokens


def step_through(llm, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], int]:
    """Greedy outputs of ``prompts`` stepped one engine step at a time (in order), and how many
    preemptions the scheduler made on the way."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    scheduler, engine = scheduler_of(llm), llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), TokensPrompt(prompt_token_ids=prompt), params)
    outputs, seen = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[int(out.request_id)] = list(out.outputs[0].token_ids)
        seen.update(scheduler.requests)
    preemptions = sum(r.num_preemptions for r in seen.values())
    return [outputs[i] for i in range(len(prompts))], preemptions


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


@torch.no_grad()
def lrsa_forward_logits(model, input_ids: torch.Tensor, cfg) -> torch.Tensor:
    """Logits of one forward pass under the LRSA mask (what training optimises), for comparing
    with the serving engine's prefill. The model's attention and settings are restored after."""
    from lrsa_serve.training.attention.dispatch import use_lrsa

    previous_impl = model.config._attn_implementation
    previous_cfg = getattr(model.config, "lagkv", None)
    use_lrsa(model, cfg)
    try:
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        return model(input_ids=input_ids.to(model.device), use_cache=False).logits
    finally:
        model.set_attn_implementation(previous_impl)
        if previous_cfg is None:
            del model.config.lagkv
        else:
            model.config.lagkv = previous_cfg
