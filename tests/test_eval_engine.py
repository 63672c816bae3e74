"""``lrsa eval``'s in-process target: batching, per-task answer budgets and failures with a stand-in
engine, then once through a real vLLM engine (the session's, shared with test_engine)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lrsa_serve.config import LagKVConfig
from lrsa_serve.eval.runner import EngineTarget, run_targets
from lrsa_serve.eval.tasks import build_items, resolve_tasks


class FakeLLM:
    """Answers every prompt with its expected values; the ``fail_batch``-th call raises."""

    def __init__(self, answers: dict[str, str], fail_batch: int | None = None) -> None:
        self.answers, self.fail_batch, self.calls = answers, fail_batch, []

    def _outputs(self, prompts, params):
        self.calls.append([p.max_tokens for p in params])
        if len(self.calls) == self.fail_batch:
            raise RuntimeError("KV cache exhausted\nsecond line")
        return [SimpleNamespace(outputs=[SimpleNamespace(text=self.answers[p])]) for p in prompts]

    def generate(self, prompts, params, use_tqdm=True):
        return self._outputs(prompts, params)

    def chat(self, conversations, params, use_tqdm=True):
        return self._outputs([c[-1]["content"] for c in conversations], params)


@pytest.fixture(scope="module")
def items(tokenizer):
    specs = resolve_tasks(["passkey", "niah_multivalue"])
    return build_items(tokenizer, specs, [200], [0.2, 0.5, 0.8], 1)  # 6 items


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_batches_budgets_and_a_failed_batch(items, api):
    answers = {item.example.prompt: " ".join(item.expected) for item in items}
    llm = FakeLLM(answers, fail_batch=2)
    target = EngineTarget("m", LagKVConfig(sink=32, lag=128, ratio=0.25), api=api, batch=4,
                          llm=llm)  # fmt: skip
    run = run_targets([target], items, {}, progress=False)
    # 6 items in batches of 4 and 2, each request with its task's answer budget
    assert llm.calls == [[item.max_tokens for item in items[:4]], [64, 64]]
    assert [r.score for r in run.results] == [1.0] * 4 + [0.0] * 2
    assert {r.answer.error for r in run.results[4:]} == {"generation failed: KV cache exhausted "
                                                         "second line"}  # fmt: skip
    assert run.targets[0].name == "S32 L128 r0.25" and run.targets[0].kept_ratio == 0.25
    assert target.llm is llm  # an engine handed in is not shut down


def test_engine_that_cannot_start_fails_its_requests(items, default_model, monkeypatch):
    import vllm

    def broken(**kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(vllm, "LLM", broken)
    target = EngineTarget(default_model, None, batch=4)
    run = run_targets([target], items, {}, progress=False)
    assert run.targets[0].name == "dense" and run.targets[0].kept_ratio == 1.0
    assert all(r.answer.error == "engine failed to start: out of memory" for r in run.results)
    assert "engine failed to start: out of memory" in run.targets[0].notes


@pytest.mark.engine
def test_real_engine(engines, tokenizer):
    """The session engine with the default settings (test_engine's last one: reused when the
    suite runs in order): both APIs answer, and the 1K passkey survives 4x compression."""
    settings = LagKVConfig()
    llm = engines.get(lagkv=settings.model_dump())
    items = build_items(tokenizer, resolve_tasks(["passkey"]), [1024], [0.5], 1)
    for api in ("completions", "chat"):
        target = EngineTarget(engines.model, settings, api=api, llm=llm)
        run = run_targets([target], items, {}, progress=False)
        (result,) = run.results
        assert result.answer.error is None and result.answer.text
        if api == "completions":
            assert result.score == 1.0, result.answer.text
