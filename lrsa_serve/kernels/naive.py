"""LagKV select and compact on a paged KV cache, in plain torch on top of ``lagkv.py``.

The CPU engine runs these; the Triton kernels (``select.py``, ``compact.py``) are tested
against them. Paged layout, per layer:

- ``key_cache``, ``value_cache``: ``[num_blocks, num_kv_heads, block_size, head_dim]`` views
  (any strides: vLLM's CPU layout stores K and V as two halves of one block, its Triton layout
  packs K|V in the last dim; callers pass the two views).
- ``part_blocks``: ``[R, L / block_size]`` physical block ids of partition p of each of R
  requests; ``ref_blocks``: the same for partition p+1 (the lag reference).
- ``kept``: ``[R, num_kv_heads, keep]`` token indices inside the partition, increasing.
"""

from __future__ import annotations

import torch

from lrsa_serve import lagkv


def gather_rows(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Rows of the given blocks in order: ``[R, num_kv_heads, nb * block_size, head_dim]``."""
    return cache[block_ids.long()].permute(0, 2, 1, 3, 4).flatten(2, 3)


def select_kept(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    part_blocks: torch.Tensor,
    ref_blocks: torch.Tensor,
    keep: int,
    score_v_ratio: float = 1.0,
) -> torch.Tensor:
    """Top-``keep`` tokens of each partition per KV head, scored against its successor."""
    part = [gather_rows(cache, part_blocks) for cache in (key_cache, value_cache)]
    ref = [gather_rows(cache, ref_blocks) for cache in (key_cache, value_cache)]
    return lagkv.select_partition(*part, *ref, keep, score_v_ratio)


def compact_kept(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    part_blocks: torch.Tensor,
    kept: torch.Tensor,
) -> None:
    """Move each partition's kept rows, in order, to the front of its first ``keep/block_size``
    blocks, in place. Sources and destinations overlap; the gather copies before any write."""
    block_size = key_cache.shape[2]
    keep = kept.shape[-1]
    assert keep % block_size == 0, "keep must be a multiple of the block size"
    dst_blocks = part_blocks[:, : keep // block_size].long()
    for cache in (key_cache, value_cache):
        rows = gather_rows(cache, part_blocks)
        moved = rows.gather(2, kept[..., None].long().expand(-1, -1, -1, rows.shape[-1]))
        cache[dst_blocks] = moved.unflatten(2, (keep // block_size, block_size)).transpose(1, 2)
