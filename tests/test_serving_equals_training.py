"""What is served is what was trained: the engine's prefill under LagKV gives the same
log-probabilities as the training forward (LRSA mask, one pass) on the same checkpoint."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import lrsa_forward_logits

from lrsa_serve.config import LagKVConfig
from lrsa_serve.synthetic_tasks import passkey
from lrsa_serve.training.attention import dispatch

pytestmark = pytest.mark.engine

CFG = LagKVConfig(sink=32, lag=128, ratio=0.25)  # ~1.5K tokens: 9 compressed partitions
TOP = 5


@pytest.fixture(scope="module")
def prompt(tokenizer) -> list[int]:
    ids = tokenizer.encode(passkey(tokenizer, 1500, 0.4, 11).prompt)
    assert len(ids) > CFG.sink + 10 * CFG.lag
    return ids


@pytest.fixture(scope="module")
def engine_logprobs(engines, prompt):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = engines.get(lagkv=CFG.model_dump())
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=TOP)
    (out,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
    return out.prompt_logprobs


@pytest.mark.parametrize("kernel", ["auto", "math"])  # on CPU: the dense reference; varlen
def test_engine_prefill_equals_lrsa_forward(kernel, hf_model, prompt, engine_logprobs):
    dispatch.set_kernel(kernel)
    try:
        logits = lrsa_forward_logits(hf_model, torch.tensor(prompt), CFG)
    finally:
        dispatch.set_kernel("auto")
    trained = torch.log_softmax(logits[0].double(), dim=-1)
    worst = 0.0
    for pos in range(1, len(prompt)):
        served = engine_logprobs[pos]  # distribution of token `pos` given tokens before it
        for token_id, logprob in served.items():
            worst = max(worst, abs(logprob.logprob - float(trained[pos - 1, token_id])))
        top_served = max(served.items(), key=lambda item: item[1].logprob)[0]
        assert top_served == int(trained[pos - 1].argmax()) or (
            # equal within tolerance: a tie the two sides may break differently
            abs(float(trained[pos - 1].max()) - float(trained[pos - 1, top_served])) < 1e-4
        )
    assert worst < 1e-4, worst
