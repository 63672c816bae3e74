"""Shared fixtures: the default model (prepared once, reused), engines and the HF reference."""

from __future__ import annotations

import gc
import os

import pytest

# In-process engines: tests read the scheduler's KV manager directly.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_model() -> str:
    from lrsa_serve.models import prepare_default_model

    return str(prepare_default_model())


@pytest.fixture(scope="session")
def tokenizer(default_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model)


@pytest.fixture(scope="session")
def hf_model(default_model):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32).eval()


class EngineBox:
    """Builds one in-process engine at a time and shuts the previous one down."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.llm = None
        self.key = None

    def get(self, **kwargs):
        from lrsa_serve.engine import make_llm

        key = tuple(sorted(kwargs.items()))
        if key != self.key:
            self.close()
            base = dict(dtype="float32", max_model_len=8192, enforce_eager=True, seed=0)
            self.llm = make_llm(self.model, **(base | kwargs))
            self.key = key
        return self.llm

    def close(self) -> None:
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            self.key = None
            gc.collect()


@pytest.fixture(scope="session")
def engines(default_model):
    box = EngineBox(default_model)
    yield box
    box.close()


# One server for every HTTP-level test module (server, load test, eval): starting one costs a
# minute or more on 2 cores. LagKV settings small enough that ~1.5K-token prompts compress 8+
# partitions.
LIVE_SERVER_ARGS = (
    "--sink", "32", "--lag", "128", "--ratio", "0.25", "--dtype", "float32",
    "--enforce-eager", "--max-model-len", "4096", "--max-num-seqs", "8",
    "--max-tokens-cap", "24",
)  # fmt: skip
LIVE_SERVER_KEY = "test-secret"


@pytest.fixture(scope="session")
def live_server(default_model):
    from server_helpers import LiveServer

    with LiveServer(*LIVE_SERVER_ARGS, api_key=LIVE_SERVER_KEY) as server:
        yield server
