"""LagKV selection of whole training sequences: ``select_kept`` picks how (plain torch, compiled,
or the serving engine's Triton select kernel) and replays it under gradient checkpointing.

``lagkv.select_all`` scores every compressed partition of a sequence in plain torch: a dozen
elementwise and reduction passes, then a sort (at 32K, 2 KV heads of 64: 0.19 ms of H100 time
per layer compiled, 0.41 eager; the engine's kernel ``kernels/select.py``: 0.06 ms). That
kernel reads tokens through block ids, and a training K/V tensor ``[B, Hkv, n, D]`` is such a
cache once every token is its own block (block size 1): block ``b * step + t`` is token t of
sequence b, where ``step`` is the batch stride in tokens. Each compressed partition p of
sequence b is one "request" whose blocks are its L tokens and whose reference blocks are
partition p+1's. So the trainer selects with exactly the code that serves; its indices equal
``lagkv.select_all``'s up to near-ties in the last ulp (see ``select.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch

from lrsa_serve import lagkv
from lrsa_serve.lagkv import Rule
from lrsa_serve.training.attention import replay

# From this many tokens the Triton selection and packing (``select_all`` here, ``pack_rows``) are
# the CUDA defaults: a 32K training step of the 0.5B model ran 1.79x dense with them vs 1.72x
# without (H100); at 16K the step is partly CPU-bound and their launches cost more Python time
# than they save on the GPU (1.15x vs 1.27x). docs/training.md.
TRITON_MIN_LENGTH = 32768
# Distinct compiled graphs we allow, so that a run never reaches dynamo's default limit.
RECOMPILE_LIMIT = 256


def select_kept(key: torch.Tensor, value: torch.Tensor, rule: Rule) -> torch.Tensor:
    """Kept absolute positions ``[B, Hkv, P, keep]`` (``lagkv.select_all``), without gradient.
    In a checkpointed layer's recompute, the positions its forward selected
    (``replay``)."""
    return replay.remembered(selector(selector_for(key)), key, value, rule)


def selector_for(key: torch.Tensor) -> str:
    """On CUDA the serving engine's Triton kernel (``select_all``: three launches per layer)
    from ``TRITON_MIN_LENGTH`` tokens and ``compiled`` (``lagkv.select_all`` under
    ``torch.compile``) below; ``eager`` (plain torch) on CPU."""
    if not key.is_cuda:
        return "eager"
    return "triton" if key.shape[2] >= TRITON_MIN_LENGTH else "compiled"


@lru_cache(maxsize=4)
def selector(name: str) -> Callable:
    """The selection function ``selector_for`` names: ``(key, value, rule) -> kept``."""
    if name == "triton":
        return select_all
    if name == "compiled":
        _raise_recompile_limit()
        return torch.compile(lagkv.select_all, dynamic=True)
    return lagkv.select_all


def _raise_recompile_limit() -> None:
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    # Past the limit dynamo would fall back to eager code silently: fail loudly instead.
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True


def token_blocks(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` ``[B, H, n, D]`` as a paged cache of one-token blocks ``[blocks, H, 1, D]`` (a view,
    no copy) and the block-id step between sequences. Needs the batch stride to be a whole number
    of token strides, which holds for both layouts a model produces (heads-major or tokens-major);
    other layouts are copied first."""
    b, h, n, d = x.shape
    sb, sh, st, sd = x.stride()
    if st <= 0 or sb % st:
        x = x.contiguous()
        sb, sh, st, sd = x.stride()
    step = sb // st if b > 1 else n
    blocks = (b - 1) * step + n
    return x.as_strided((blocks, h, 1, d), (st, sh, st, sd)), step


@lru_cache(maxsize=64)
def partition_blocks(
    batch: int, parts: int, step: int, rule: Rule, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block ids of every compressed partition (``[batch * parts, lag]`` int32, sequence-major),
    of its reference, the next partition, and each partition's first position (``[parts]``)."""
    starts = lagkv.partition_start(torch.arange(parts), rule)
    seq = step * torch.arange(batch)
    part = (seq[:, None, None] + starts[None, :, None] + torch.arange(rule.lag)).flatten(0, 1)
    part = part.to(torch.int32).to(device)
    return part, part + rule.lag, starts.to(device)


def select_all(key: torch.Tensor, value: torch.Tensor, rule: Rule) -> torch.Tensor:
    """``lagkv.select_all`` of ``[B, Hkv, n, D]`` keys/values through the Triton kernel:
    ``[B, Hkv, P, keep]`` absolute positions, increasing within each partition. CUDA tensors, or
    CPU ones under ``TRITON_INTERPRET=1``."""
    from lrsa_serve.kernels import select

    b, h, n, _ = key.shape
    parts = lagkv.compressed_partitions(n, rule)
    if parts == 0:
        return torch.empty(b, h, 0, rule.keep, dtype=torch.long, device=key.device)
    key_cache, step = token_blocks(key)
    value_cache, value_step = token_blocks(value)
    if value_step != step:  # both views must number their blocks alike
        key_cache, step = token_blocks(key.contiguous())
        value_cache, _ = token_blocks(value.contiguous())
    part, ref, starts = partition_blocks(b, parts, step, rule, str(key.device))
    kept = select.select_kept(key_cache, value_cache, part, ref, rule.keep, rule.score_v_ratio)
    kept = kept.view(b, parts, h, rule.keep) + starts[None, :, None, None]
    return kept.transpose(1, 2)
