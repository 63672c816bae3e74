"""LagKV select and compact on the paged KV cache: Triton on CUDA, plain torch on the CPU.

``select_kept`` / ``compact_kept`` / ``compress_partitions`` take the tensors of one layer
(layout and meaning in ``naive.py``) and run:

- the Triton kernels (``select.py``, ``compact.py``) when the caches are on CUDA;
- the same kernels on CPU tensors when the caller passes ``use_triton=True`` and Triton runs its
  interpreter (``TRITON_INTERPRET=1`` when ``select.py`` was first imported: Triton decides at
  decoration time) - the tests do this;
- the plain-torch path (``naive.py``) otherwise, e.g. the CPU engine.

``use_triton=False`` forces the torch path on any device. Triton is imported only when used, so
the CPU engine does not need it.
"""

from __future__ import annotations

import torch

from lrsa_serve.kernels import naive


def triton_interpreted() -> bool:
    """Whether the Triton kernels were built for the interpreter (so they accept CPU tensors)."""
    from lrsa_serve.kernels import select

    return select.INTERPRETED


def _use_triton(cache: torch.Tensor, use_triton: bool | None) -> bool:
    if use_triton is False:
        return False
    if cache.is_cuda:
        return True
    if use_triton is None:
        return False
    if not triton_interpreted():
        raise RuntimeError(
            "Triton kernels on CPU tensors need TRITON_INTERPRET=1 in the environment before "
            "lrsa_serve.kernels.select is imported"
        )
    return True


def select_kept(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    part_blocks: torch.Tensor,
    ref_blocks: torch.Tensor,
    keep: int,
    score_v_ratio: float = 1.0,
    *,
    use_triton: bool | None = None,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-``keep`` tokens of each partition per KV head, scored against its successor:
    ``[R, num_kv_heads, keep]`` int64, increasing. With ``active`` (``[R]`` int32), rows whose
    entry is 0 are skipped and their output rows are undefined."""
    if _use_triton(key_cache, use_triton):
        from lrsa_serve.kernels import select

        return select.select_kept(
            key_cache, value_cache, part_blocks, ref_blocks, keep, score_v_ratio, active=active
        )
    rows = _active_rows(active, part_blocks.shape[0]).to(part_blocks.device)
    kept = torch.zeros(
        part_blocks.shape[0], key_cache.shape[1], keep, dtype=torch.long, device=key_cache.device
    )
    kept[rows] = naive.select_kept(
        key_cache, value_cache, part_blocks[rows], ref_blocks[rows], keep, score_v_ratio
    )
    return kept


def _active_rows(active: torch.Tensor | None, rows: int) -> torch.Tensor:
    if active is None:
        return torch.arange(rows)
    return torch.nonzero(active.cpu()).flatten()


def compact_kept(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    part_blocks: torch.Tensor,
    kept: torch.Tensor,
    *,
    use_triton: bool | None = None,
    active: torch.Tensor | None = None,
) -> None:
    """Move each partition's kept rows, in order, to the front of its first
    ``keep / block_size`` blocks, in place (only rows with ``active[r] != 0`` when given)."""
    if _use_triton(key_cache, use_triton):
        from lrsa_serve.kernels import compact

        compact.compact_kept(key_cache, value_cache, part_blocks, kept, active)
        return
    rows = _active_rows(active, part_blocks.shape[0]).to(part_blocks.device)
    naive.compact_kept(key_cache, value_cache, part_blocks[rows], kept[rows])


def compress_partitions(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    part_blocks: torch.Tensor,
    ref_blocks: torch.Tensor,
    keep: int,
    score_v_ratio: float = 1.0,
    *,
    use_triton: bool | None = None,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """Select then compact partition p of every request of this layer (of the rows with
    ``active[r] != 0`` when given); returns ``kept``. After it, the first ``keep / block_size``
    blocks of ``part_blocks[r]`` hold the kept tokens and the partition's other blocks can be
    freed."""
    kept = select_kept(
        key_cache,
        value_cache,
        part_blocks,
        ref_blocks,
        keep,
        score_v_ratio,
        use_triton=use_triton,
        active=active,
    )
    compact_kept(key_cache, value_cache, part_blocks, kept, use_triton=use_triton, active=active)
    return kept


__all__ = ["compact_kept", "compress_partitions", "naive", "select_kept", "triton_interpreted"]
