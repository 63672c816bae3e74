"""Building the model for training: load, pick the attention, checkpoint activations, shard.

Parallelism is applied in one place (``parallelize``): with more than one process (torchrun)
every decoder layer and then the root are wrapped with FSDP2's ``fully_shard``; with one process
nothing is wrapped and the same loop runs. Parameters stay float32 (the optimizer's master copy)
and the forward runs under bf16 autocast on CUDA in both cases, so 1 and N GPUs compute the same
thing.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lrsa_serve.config import LagKVConfig
from lrsa_serve.errors import UserError
from lrsa_serve.training.attention import dispatch, replay
from lrsa_serve.training.attention.dispatch import use_lrsa

# Families whose attention goes through transformers' AttentionInterface with GQA K/V shapes
# (checked: Llama, Qwen2, Mistral); others may work but are not tested.
SUPPORTED_TYPES = ("llama", "qwen2", "qwen3", "mistral")


# The dense baseline: transformers' own SDPA call, registered under a name of ours so that
# transformers builds no mask for it. Under "sdpa" every forward first checks the positions for
# packed sequences, a read of the device (the host waits for the GPU), and inside a CUDA graph
# capture, where it cannot read, it builds a full mask, which takes SDPA off its causal kernels.
# The trainer's batches need none: whole right-padded sequences from position 0 (data.collate).
DENSE = "lrsa_dense_sdpa"


def _dense_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    if query.shape[2] != key.shape[2]:  # SDPA's causal mask is aligned top-left
        raise ValueError("dense training attention takes whole sequences (no KV cache)")
    return sdpa_attention_forward(
        module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=True
    )


AttentionInterface.register(DENSE, _dense_attention)


def load_model(path: str) -> PreTrainedModel:
    """float32 weights (the optimizer's master copy), SDPA attention until one is chosen."""
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa"
    )


def check_supported(model: PreTrainedModel) -> None:
    config = model.config
    if config.model_type not in SUPPORTED_TYPES:
        raise UserError(
            f"model type {config.model_type!r} is not supported for LRSA training "
            f"(supported: {', '.join(SUPPORTED_TYPES)})"
        )
    # Qwen2 carries a sliding_window it does not use (use_sliding_window=False); Mistral v0.1
    # uses its sliding_window whenever it is set.
    windowed = getattr(config, "sliding_window", None) is not None
    if getattr(config, "use_sliding_window", windowed):
        raise UserError("sliding-window attention models are not supported by LRSA training")


def set_attention(
    model: PreTrainedModel,
    attention: str,
    cfg: LagKVConfig,
    kernel: str = "auto",
    *,
    cuda_graphs: bool = True,
) -> None:
    """``lrsa``: the LagKV mask (one varlen attention call on CUDA, the dense masked path on
    CPU; ``kernel`` pins the varlen call's kernel, ``dispatch.set_kernel``; ``cuda_graphs``
    replays its calls from CUDA graphs, ``dispatch.set_cuda_graphs``); ``dense``: vanilla causal
    SDPA, the baseline (``DENSE``)."""
    if attention == "lrsa":
        dispatch.set_kernel(kernel)
        dispatch.set_cuda_graphs(cuda_graphs)
        use_lrsa(model, cfg)
    elif attention == "dense":
        model.set_attn_implementation(DENSE)
    else:
        raise UserError(f"unknown attention {attention!r}")


def prepare_for_training(
    model: PreTrainedModel, gradient_checkpointing: bool, *, replay_selection: bool = True
) -> None:
    """Training mode, no KV cache, and per-layer activation checkpointing when asked (off:
    disabled). With ``replay_selection`` the recompute reuses the forward's LRSA selection
    (``attention.replay``) instead of selecting again."""
    model.config.use_cache = False
    if gradient_checkpointing:
        # Non-reentrant: works with FSDP2, and takes the context_fn that replays the selection.
        # The RNG state is saved for the recompute only where dropout draws from it: reading
        # it costs host time per layer and cannot happen inside a CUDA graph capture.
        kwargs: dict = {"use_reentrant": False, "preserve_rng_state": uses_dropout(model)}
        if replay_selection:
            kwargs["context_fn"] = replay.checkpoint_contexts
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()
    model.train()


def uses_dropout(model: torch.nn.Module) -> bool:
    """Whether a training forward draws random numbers: a dropout module or attention dropout
    with a non-zero rate."""
    rate = getattr(getattr(model, "config", None), "attention_dropout", 0.0) or 0.0
    modules = (m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd))
    return rate > 0 or any(m.p > 0 for m in modules)


def compile_layers(model: PreTrainedModel) -> None:
    """``torch.compile`` every decoder layer in place, so the pointwise glue around the matmuls
    (norms with their fp32 upcast, RoPE, the gated MLP, residuals) fuses instead of making one
    pass over a long activation per op; the LRSA attention is one opaque node of that graph
    (the custom op ``lrsa::varlen``; its other paths run eagerly behind a graph break). Layers
    share one graph; lengths become dynamic after the first new one."""
    for layer in decoder_layers(model):
        layer.compile()


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserError(f"cannot find the decoder layers of {type(model).__name__}")
    return layers


def parallelize(model: PreTrainedModel, world_size: int) -> PreTrainedModel:
    """FSDP2 over all ranks when there are several; the model unchanged otherwise."""
    if world_size <= 1:
        return model
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)  # embeddings, final norm, (tied) LM head
    return model
