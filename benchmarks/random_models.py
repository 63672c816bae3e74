"""Small stand-ins for tests, smoke runs and speed benchmarks: a byte-level BPE tokenizer trained
in memory (with a ChatML template) and randomly initialised Llama/Qwen2 models of any size.
Nothing is downloaded.

Here rather than in lrsa_serve, which never uses it: ``train_model`` builds its random model with
it (of a shape from configs/), its ``--smoke`` run and the tests their tiny models, and
docs/training.md saves a tiny model with ``save_tiny_model`` for the two-GPU comparison."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lrsa_serve.synthetic_tasks import FILLER

if TYPE_CHECKING:  # transformers loads on first use
    from transformers import PretrainedConfig

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer() -> Any:
    """A fast byte-level BPE tokenizer (offsets work) trained on the synthetic tasks' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [
        FILLER,
        '0123456789 abcdef ABCDEFGHIJKLMNOPQRSTUVWXYZ VAR = . : ? ! { } " ,',
        "The pass key is. What is the special magic number for. Extract the value key JSON",
        "Question: Find all variables that are assigned the value Answer: user assistant system",
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def tiny_config(kind: str = "llama", vocab_size: int = 400, **overrides: Any) -> PretrainedConfig:
    """A few-layer GQA config of the given family (4 query heads, 2 KV heads, head_dim 16)."""
    from transformers import LlamaConfig, Qwen2Config

    fields = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    fields.update(overrides)
    if kind == "llama":
        return LlamaConfig(**fields)
    if kind == "qwen2":
        return Qwen2Config(use_sliding_window=False, **fields)
    raise ValueError(f"unknown tiny model kind {kind!r}")


def random_model(config: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def save_tiny_model(
    folder: str | Path, kind: str = "llama", seed: int = 0, **overrides: Any
) -> Path:
    """A random tiny model + tokenizer saved as an HF folder (what ``lrsa train MODEL`` takes)."""
    folder = Path(folder)
    tokenizer = tiny_tokenizer()
    model = random_model(tiny_config(kind, vocab_size=len(tokenizer), **overrides), seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
