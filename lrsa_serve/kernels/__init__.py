"""LagKV select and compact on the paged KV cache: Triton on CUDA, plain torch on the CPU.

``compress_layers`` takes the caches of every layer of a step (``LayerStack``; layout and meaning
in ``naive.py``) and runs the Triton kernels (``select.py``, ``compact.py``) on CUDA caches, or on
CPU ones with ``use_triton=True`` under Triton's interpreter (``TRITON_INTERPRET=1`` before
``select.py`` is first imported: the tests); else the plain-torch path (``naive.py``, the kernels'
oracle; ``use_triton=False`` forces it). Triton is imported only when used. The CPU engine
compacts vLLM's CPU block layout with its own torch code (``engine/cpu_backend.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrsa_serve import lagkv
from lrsa_serve.kernels import naive


def _use_triton(cache: torch.Tensor, use_triton: bool | None) -> bool:
    if use_triton is False:
        return False
    if cache.is_cuda:
        return True
    if use_triton is None:
        return False
    from lrsa_serve.kernels import select

    if not select.INTERPRETED:  # the kernels were built for the compiler: no CPU tensors
        raise RuntimeError(
            "Triton kernels on CPU tensors need TRITON_INTERPRET=1 in the environment before "
            "lrsa_serve.kernels.select is imported"
        )
    return True


def _compress_torch(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    part_blocks: torch.Tensor,
    ref_blocks: torch.Tensor,
    rule: lagkv.Rule,
    active: torch.Tensor | None,
) -> torch.Tensor:
    rows = torch.arange(part_blocks.shape[0]) if active is None else active.cpu().nonzero()[:, 0]
    rows = rows.to(part_blocks.device)
    part, ref = part_blocks[rows], ref_blocks[rows]
    kept = key_cache.new_zeros(
        part_blocks.shape[0], key_cache.shape[1], rule.keep, dtype=torch.long
    )
    kept[rows] = naive.select_kept(key_cache, value_cache, part, ref, rule.keep, rule.score_v_ratio)
    naive.compact_kept(key_cache, value_cache, part, kept[rows])
    return kept


@dataclass(frozen=True)
class LayerStack:
    """The K and V caches of every layer of one KV-cache group, as one launch addresses them:
    layer 0's views plus each layer's element offset from them (``offsets``, int64 on the
    caches' device, made once: a captured CUDA graph reads it at every replay)."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    offsets: torch.Tensor

    @classmethod
    def of(cls, keys: list[torch.Tensor], values: list[torch.Tensor]) -> LayerStack:
        k0, v0 = keys[0], values[0]
        size = k0.element_size()
        shifts = []
        for k, v in zip(keys, values, strict=True):
            same = (k.shape, k.stride(), k.dtype, v.shape, v.stride(), v.dtype) == (
                k0.shape, k0.stride(), k0.dtype, v0.shape, v0.stride(), v0.dtype
            )  # fmt: skip
            shift = k.data_ptr() - k0.data_ptr()
            if not same or shift % size or v.data_ptr() - v0.data_ptr() != shift:
                raise ValueError("every layer's K/V caches must be laid out alike")
            shifts.append(shift // size)
        offsets = torch.tensor(shifts, dtype=torch.int64).to(k0.device)
        return cls(tuple(keys), tuple(values), offsets)

    def holds(self, keys: list[torch.Tensor]) -> bool:
        """Whether these are still the stack's caches (same storage, same order)."""
        return len(keys) == len(self.keys) and all(
            a.data_ptr() == b.data_ptr() for a, b in zip(keys, self.keys, strict=True)
        )


def compress_layers(
    stack: LayerStack,
    part_blocks: torch.Tensor,
    ref_blocks: torch.Tensor,
    rule: lagkv.Rule,
    *,
    use_triton: bool | None = None,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """Select the top ``rule.keep`` tokens of partition p of every request per KV head, scored
    against p+1, then move them, in order, to the front of the partition's first
    ``keep / block_size`` blocks, in place, in every layer of the stack (same blocks in each);
    the partition's other blocks can then be freed. Returns ``kept``: ``[layers, R, kv_heads,
    keep]`` int64, increasing. With ``active`` (``[R]`` int32), rows whose entry is 0 are left
    alone and their ``kept`` rows are undefined. On Triton: one select and one compact launch
    for all layers (grouped under ``LAYERS_SCRATCH_BYTES``)."""
    key, value = stack.keys[0], stack.values[0]
    if not _use_triton(key, use_triton):
        return torch.stack(
            [
                _compress_torch(k, v, part_blocks, ref_blocks, rule, active)
                for k, v in zip(stack.keys, stack.values, strict=True)
            ]
        )
    from lrsa_serve.kernels import compact, select

    keep = rule.keep
    layers = len(stack.keys)
    rows, blocks = part_blocks.shape
    length = blocks * key.shape[2]
    width = 1 << (max(key.shape[-1], value.shape[-1]) - 1).bit_length()
    # a layer's scratch: its scores and partial ranges (float32), its kept indices (int64)
    per_layer = rows * key.shape[1] * (2 * length * 4 + 2 * 2 * width * 4 + keep * 8)
    group = max(1, min(layers, LAYERS_SCRATCH_BYTES // per_layer))
    kept = torch.empty(layers, rows, key.shape[1], keep, dtype=torch.int64, device=key.device)
    for first in range(0, layers, group):
        offsets = stack.offsets[first : first + group]
        select.select_kept(
            key, value, part_blocks, ref_blocks, keep, rule.score_v_ratio,
            out=kept[first : first + group], active=active, layer_offsets=offsets,
        )  # fmt: skip
        compact.compact_kept(
            key, value, part_blocks, kept[first : first + group], active, layer_offsets=offsets
        )
    return kept


# Scratch of one set of launches (scores, ranges, kept indices of every layer it covers): layers
# are grouped to stay under it, so a captured graph of a large batch keeps a bounded pool.
LAYERS_SCRATCH_BYTES = 256 << 20
