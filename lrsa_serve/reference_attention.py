"""Exact LagKV attention for any HF transformers model: the serving oracle, slow and obvious.

Registered in transformers' ``AttentionInterface`` under ``"lagkv_reference"``. Every layer
selects kept tokens from its own post-RoPE keys and values (``lagkv.select_all``) and attends
in float32 under ``lagkv.visibility_mask``, per KV head. Generation with HF's ordinary cache
works because the rule is a function of positions: each step recomputes the (deterministic)
selection from the full cache and masks accordingly.

Batches must hold sequences that start at position 0 with no left padding (right padding is
harmless for causal attention); the settings come from ``model.config.lagkv``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AttentionInterface, PreTrainedModel

from lrsa_serve import lagkv
from lrsa_serve.config import CONFIG_KEY, LagKVConfig
from lrsa_serve.training.attention import replay

NAME = "lagkv_reference"
# Queries per block: bounds the float32 score matrix at long lengths (9 heads x 1024 x 8K ~ 300 MB).
QUERY_BLOCK = 1024


def settings_of(module: torch.nn.Module) -> LagKVConfig:
    """The LagKV settings in ``module.config`` (a model's or a layer's)."""
    section = getattr(module.config, CONFIG_KEY, None)
    if section is None:
        raise ValueError(f"{NAME} attention needs config.{CONFIG_KEY} (see use_lagkv_reference)")
    return section if isinstance(section, LagKVConfig) else LagKVConfig.build(**section)


def register(
    name: str, attend: Callable[..., torch.Tensor]
) -> Callable[[PreTrainedModel, LagKVConfig], PreTrainedModel]:
    """Register ``attend(module, query, key, value, scaling, dropout)`` (queries
    ``[B, Hq, n, D]``, K/V ``[B, Hkv, Tk, D]``; output ``[B, n, Hq, D]``) in transformers'
    ``AttentionInterface`` as ``name``, behind the interface's signature; the scaling is
    1/sqrt(D) unless given. The attention mask and other arguments are not read (causal
    attention; sequences start at position 0, see the module docstring). Returns the function
    that switches a loaded HF model to this attention with given settings."""

    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        return attend(module, query, key, value, scaling, dropout), None

    AttentionInterface.register(name, attention)

    def use(model: PreTrainedModel, cfg: LagKVConfig) -> PreTrainedModel:
        model.config.lagkv = cfg.model_dump()
        model.set_attn_implementation(name)
        return model

    return use


def masked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Softmax attention under a per-KV-head mask, in float32 (float64 stays float64): the one
    plain-torch attention of training, forward and (through autograd) backward, that the dense
    path and the varlen ``math`` kernel run and the fast kernels are tested against.

    query ``[B, Hq, Tq, D]``; key/value ``[B, Hkv, Tk, D]``; visible ``[B, Hkv, Tq, Tk]`` bool.
    Returns ``[B, Tq, Hq, D]`` in the query's dtype. The query heads of a KV head are stacked
    along the query axis so that one SDPA call with a boolean mask serves the group (on CPU its
    blockwise kernel ran 2.2x faster than writing the scores out, forward and backward alike).
    """
    b, hkv, tq, tk = visible.shape
    groups = query.shape[1] // hkv
    dtype = torch.promote_types(query.dtype, torch.float32)
    q = query.to(dtype).unflatten(1, (hkv, groups)).flatten(2, 3)  # B, Hkv, G*Tq, D
    mask = visible[:, :, None].expand(b, hkv, groups, tq, tk).flatten(2, 3)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, key.to(dtype), value.to(dtype), attn_mask=mask, scale=scaling
    )
    return out.unflatten(2, (groups, tq)).flatten(1, 2).transpose(1, 2).to(query.dtype)


def exact_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """The exact LagKV attention of ``module`` (``register``'s ``attend``): the dense masked
    path, by blocks of ``QUERY_BLOCK`` queries."""
    rule = settings_of(module).rule
    num_keys, num_queries = key.shape[2], query.shape[2]
    kept = replay.remembered(lagkv.select_all, key, value, rule)  # a checkpoint recompute replays
    outputs = []
    for lo in range(0, num_queries, QUERY_BLOCK):
        hi = min(num_queries, lo + QUERY_BLOCK)
        first = num_keys - num_queries + lo
        end = first + (hi - lo)  # the keys this block's last query sees
        visible = lagkv.visibility_mask(end, kept, rule, query_start=first)
        k, v = key[:, :, :end], value[:, :, :end]
        outputs.append(masked_attention(query[:, :, lo:hi], k, v, visible, scaling))
    out = torch.cat(outputs, dim=1)
    if dropout and module.training:
        out = torch.nn.functional.dropout(out, p=dropout)
    return out


use_lagkv_reference = register(NAME, exact_attention)
