"""The model shapes benchmarks/configs ships, which gpu_serving.py (Llama-3.1-8B's) and
train_model.py (Qwen2.5-0.5B's) run with random weights: each is the real model's shape."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"


def shape(config) -> tuple:
    # Qwen2 configs have no head_dim: it is hidden_size / heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (config.num_hidden_layers, config.hidden_size, config.intermediate_size,
            config.num_attention_heads, config.num_key_value_heads, head_dim,
            config.vocab_size, config.max_position_embeddings)  # fmt: skip


def rope_theta(config) -> float:
    return (getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta})[
        "rope_theta"
    ]


def test_the_8b_config_is_llama_3_1_8b_shaped():
    config = AutoConfig.from_pretrained(CONFIGS / "llama-8b-class")
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"]
    assert shape(config) == (32, 4096, 14336, 32, 8, 128, 128256, 131072)
    assert rope_theta(config) == 500000
    assert str(config.dtype) == "torch.bfloat16"


def test_the_half_billion_config_is_qwen2_5_0_5b_shaped():
    """Positions up to 33K: train_model's 32K sequences fit."""
    config = AutoConfig.from_pretrained(CONFIGS / "qwen2-0.5b-class")
    assert config.model_type == "qwen2" and not config.use_sliding_window
    assert shape(config) == (24, 896, 4864, 14, 2, 64, 151936, 32768 + 1024)
    assert rope_theta(config) == 1_000_000 and config.tie_word_embeddings
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 494_032_768
