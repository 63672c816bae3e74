"""LRSA training attention: the ``"lrsa"`` attention of transformers and its dispatch.

Registered in transformers' ``AttentionInterface`` as ``"lrsa"`` (no model code copied); the
settings and the batches (from position 0, no left padding, no attention mask read) are as for
``"lagkv_reference"`` (``reference_attention``). The rule is docs/lagkv.md's: per layer and KV
head the kept rows of every compressed partition are selected from the layer's own post-RoPE K/V
under ``no_grad`` (``lagkv.select_all``); gradients reach K/V through the gather of the rows each
query sees.

Dispatch (explicit, never silent): on CUDA, or on any device once ``set_kernel`` names a kernel,
the rule as ONE variable-length attention call over gathered key lists (``varlen``; measured
fastest on the H100, docs/training.md), as the custom op ``lrsa::varlen`` (``op``: one node of a
compiled decoder layer) where it applies, else eagerly behind a graph break; on CPU with ``auto``,
``reference_attention``'s exact dense masked path. Queries fewer than keys (decoding with a
cache) always take the reference path: the items are defined for a whole sequence at once.
"""

from __future__ import annotations

import torch

from lrsa_serve.config import CONFIG_KEY, keep_for
from lrsa_serve.lagkv import Rule
from lrsa_serve.reference_attention import exact_attention, register, settings_of
from lrsa_serve.training.attention import graphs, op
from lrsa_serve.training.attention.varlen import check_kernel
from lrsa_serve.training.attention.varlen import lrsa_varlen_attention as lrsa_varlen

NAME = "lrsa"

# ---- the transformers attention function --------------------------------------------------------
# The varlen call's kernel for every model (``set_kernel``; the trainer passes its job's
# ``model.lrsa_kernel``). Process-wide, because transformers hands the registered attention only
# the layer (whose config is the model's), and what a config holds is saved with the model.
_kernel = "auto"


def set_kernel(kernel: str) -> None:
    """The kernel of the LRSA attention of every model: ``auto`` (the varlen call on CUDA with
    the fastest kernel that applies, the exact dense masked reference on CPU) or one of the
    varlen call's kernels (``fa4``, ``flash``, ``efficient``, ``math``), then on any device."""
    global _kernel
    _kernel = check_kernel(kernel)


def set_cuda_graphs(on: bool) -> None:
    """Whether the op's calls are captured as CUDA graphs (``op.GRAPHS``) where they can be;
    off, every call runs eagerly. Process-wide, as the kernel."""
    op.GRAPHS.clear()
    op.GRAPHS.max_graphs = graphs.MAX_GRAPHS if on else 0


def uses_varlen(query: torch.Tensor) -> bool:
    """Whether these queries take the varlen call (else the dense masked reference)."""
    return query.is_cuda or _kernel != "auto"


def _traceable_rule(module: torch.nn.Module) -> Rule | None:
    """The module's LagKV numbers read the way dynamo traces (the dict ``use_lrsa`` stores), or
    None (then the eager path reads them)."""
    section = getattr(module.config, CONFIG_KEY, None)
    if not isinstance(section, dict):
        return None
    lag, ratio = section["lag"], section["ratio"]
    return Rule(section["sink"], lag, keep_for(lag, ratio), section.get("score_v_ratio", 1.0))


def _lrsa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    dropout: float,
) -> torch.Tensor:
    """The registered attention. The varlen call runs as the custom op ``lrsa::varlen`` where it
    applies, which a compiled decoder layer traces as one node; every other path runs eagerly,
    behind a graph break (``_eager_attention``)."""
    if dropout and module.training:
        raise ValueError("LRSA attention does not implement attention dropout")
    if uses_varlen(query):
        rule = _traceable_rule(module)
        if rule is not None and query.shape[2] == key.shape[2] and op.op_applies(query):
            return op.lrsa_varlen_op(query, key, value, rule, scaling, kernel=_kernel)
    return _eager_attention(module, query, key, value, scaling)


@torch.compiler.disable  # dynamo cannot trace these paths: a compiled layer breaks its graph here
def _eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    if not uses_varlen(query) or query.shape[2] != key.shape[2]:
        return exact_attention(module, query, key, value, scaling)
    return lrsa_varlen(query, key, value, settings_of(module).rule, scaling, kernel=_kernel)


use_lrsa = register(NAME, _lrsa)
