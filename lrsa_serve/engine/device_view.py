"""The compacted view and the compaction plan of a step, computed on the GPU into persistent
buffers, so that full CUDA graphs can replay LagKV steps.

A captured graph holds tensor addresses, so everything attention and compaction read lives in
buffers allocated once, of fixed capacity (one row per request slot of vLLM's batch; what each
holds: ``kernels/compacted_view.py``).

Everything is derived on the device from vLLM's own per-step tensors (block table, sequence
lengths, query starts), so the step path has no host synchronisation and no Python per request.
A request compresses at most one partition per step: the scheduler ends prefill chunks on
partition boundaries (one partition per chunk after the first ``S + 2L`` tokens), decode adds
one token. The compaction kernels run over every row and skip inactive ones on the device, so
a captured decode graph compresses exactly when a request completes a partition and does
nothing otherwise. Host-side copies of the lengths (when vLLM provides them, without a sync)
only decide whether an eager step launches compaction at all, the kernel launch bound and the
counters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lrsa_serve.engine.compaction import CompactionPlan
from lrsa_serve.engine.layout import BlockGeometry
from lrsa_serve.kernels.compacted_view import ViewBuffers, compacted_view_torch


@dataclass
class HostView:
    """What the host knows of the step without asking the device."""

    max_seq_len: int  # physical, for the attention kernel's scheduling
    compressing: int  # requests that compress a partition this step
    upper_bound: torch.Tensor | None  # physical lengths (CPU), vLLM's seq_lens_cpu_upper_bound


class DeviceView:
    """Persistent buffers of one KV-cache group, rewritten by ``update`` every step: one Triton
    launch on CUDA (``kernels.compacted_view``), its torch reference elsewhere."""

    def __init__(self, geometry: BlockGeometry, max_reqs: int, device: torch.device) -> None:
        self.geometry = geometry
        self.device = device
        self.max_reqs = max_reqs
        cols = geometry.part_blocks
        self.seq_lens = torch.zeros(max_reqs, dtype=torch.int32, device=device)
        self.part_blocks = torch.zeros(max_reqs, cols, dtype=torch.int32, device=device)
        self.ref_blocks = torch.zeros(max_reqs, cols, dtype=torch.int32, device=device)
        self.active = torch.zeros(max_reqs, dtype=torch.int32, device=device)
        self.table: torch.Tensor | None = None  # shaped like vLLM's block table, on first use
        # Views of the first rows, by row count (a few sizes: vLLM's graph batch sizes): taken
        # once rather than sliced again every step.
        self._rows: dict[int, tuple[torch.Tensor, ...]] = {}
        self.write = compacted_view_torch
        if device.type == "cuda":
            from lrsa_serve.kernels.compacted_view_triton import compacted_view

            self.write = compacted_view
            # Compile the kernel now, at start-up: the first step may already be a CUDA graph
            # capture, where compiling cannot happen (one variant serves every batch size).
            one = torch.ones(1, 1, dtype=torch.int32, device=device)
            self.update(one, one[0], torch.arange(2, dtype=torch.int32, device=device), 1)
            self.table = None

    def update(
        self,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        query_start_loc: torch.Tensor,
        num_reqs: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewrite the buffers for this step; returns the compacted ``(block_table, seq_lens)``
        views, row-for-row like vLLM's (padding rows of a captured batch included)."""
        rows = block_table.shape[0]
        assert num_reqs <= rows <= self.max_reqs, (num_reqs, rows, self.max_reqs)
        if self.table is None or self.table.shape[1] != block_table.shape[1]:
            self.table = torch.zeros(
                self.max_reqs, block_table.shape[1], dtype=block_table.dtype, device=self.device
            )
            self._rows = {}
        buffers = ViewBuffers(
            self.table, self.seq_lens, self.part_blocks, self.ref_blocks, self.active
        )
        self.write(block_table, seq_lens, query_start_loc, num_reqs, self.geometry, buffers)
        return self.first_rows(rows)[0], self.first_rows(seq_lens.shape[0])[1]

    def first_rows(self, rows: int) -> tuple[torch.Tensor | None, ...]:
        """(table, seq_lens, part_blocks, ref_blocks, active) of the first ``rows`` rows."""
        views = self._rows.get(rows)
        if views is None:
            buffers = (self.table, self.seq_lens, self.part_blocks, self.ref_blocks, self.active)
            views = tuple(None if b is None else b[:rows] for b in buffers)  # table: first use
            self._rows[rows] = views
        return views

    def plan(self, rows: int, host: HostView | None) -> CompactionPlan:
        """Every row of the batch; the kernels skip inactive ones. An eager step whose host
        view shows no compression launches nothing; a captured graph always holds the launches."""
        _, _, part_blocks, ref_blocks, active = self.first_rows(rows)
        return CompactionPlan(
            part_blocks,
            ref_blocks,
            self.geometry.rule,
            active=active,
            launch=host is None or host.compressing > 0,
        )


def host_view(
    geometry: BlockGeometry,
    seq_lens_upper: torch.Tensor | None,
    query_start_loc_cpu: torch.Tensor,
    num_reqs: int,
    fallback_max_seq_len: int,
) -> HostView | None:
    """The step as the host sees it from vLLM's CPU copies (no device sync); None when vLLM
    gives no CPU lengths. Exact without speculative decoding, which LagKV refuses."""
    if seq_lens_upper is None:
        return None
    # Runs every step: int32 views of vLLM's CPU tensors, and as few numpy calls as it takes.
    n = num_reqs
    seq = seq_lens_upper[:n].numpy()
    starts = query_start_loc_cpu[: n + 1].numpy()
    query = starts[1:] - starts[:-1]
    before = geometry.compressed(seq - query)
    compressing = int(np.count_nonzero(geometry.compressed(seq) > before))
    if compressing:  # only a step that compresses can hold a chunk crossing a boundary
        geometry.check_chunks(seq, query, before)
    physical = seq - before * geometry.rule.evicted
    upper = seq_lens_upper.clone()
    upper.numpy()[:n] = physical
    return HostView(
        max_seq_len=int(physical.max()) if n else fallback_max_seq_len,
        compressing=compressing,
        upper_bound=upper,
    )
