"""A step's compaction of every layer of one KV-cache group, free of vLLM imports so kernels and
tests can drive it directly on synthetic paged caches."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from lrsa_serve import lagkv
from lrsa_serve.engine import stats
from lrsa_serve.kernels import LayerStack, compress_layers


@dataclass
class CompactionPlan:
    """Partitions to compress after this step's attention, one row per (request, partition).
    With ``active``, rows whose entry is 0 compress nothing (decided on the device)."""

    part_blocks: torch.Tensor  # [rows, lag / block_size] physical blocks of partition p
    ref_blocks: torch.Tensor  # [rows, lag / block_size] physical blocks of partition p+1
    rule: lagkv.Rule
    active: torch.Tensor | None = None  # [rows] int32, on the cache's device
    # False when the host knows no row is active (an eager step launches nothing).
    launch: bool = True

    @cached_property
    def active_rows(self) -> CompactionPlan:
        """The plan without its inactive rows (reads ``active`` on the host; once per step, as
        every layer of the step shares the plan)."""
        if self.active is None:
            return self
        rows = torch.nonzero(self.active.cpu()).flatten().to(self.part_blocks.device)
        return CompactionPlan(
            self.part_blocks[rows], self.ref_blocks[rows], self.rule, launch=self.launch
        )


class GroupCompaction:
    """Compacts every layer of a KV-cache group in one set of launches, once the step's
    attention has run in all of them (each layer's caches are only read again next step).

    Layers report their cache as their attention finishes (``after_layer``); the last one to
    report launches. Launched when the plan says the host saw a request complete a partition,
    and always while a CUDA graph is captured (the device then decides per row at every
    replay). The first complete step launches whatever its plan (an eager warm-up before
    capture): it compiles the Triton kernels and builds the layers' address table, neither of
    which can happen inside a capture. Caches are logical ``[blocks, kv_heads, block, 2 * head]``
    (K|V packed in the last dim)."""

    def __init__(self, layer_names: list[str], head_size: int) -> None:
        self.layer_names = list(layer_names)
        self.head_size = head_size
        self.stack: LayerStack | None = None
        self.compiled = False
        self._step: CompactionPlan | None = None
        self._seen: dict[str, torch.Tensor] = {}

    def after_layer(self, name: str, kv_cache: torch.Tensor, plan: CompactionPlan | None) -> None:
        if plan is None or kv_cache.dim() != 4:  # no cache yet (vLLM's memory profiling)
            return
        capturing = kv_cache.is_cuda and torch.cuda.is_current_stream_capturing()
        if not (plan.launch or capturing or not self.compiled):
            return
        if plan is not self._step:  # vLLM hands every layer of a step the same metadata
            self._step, self._seen = plan, {}
        self._seen[name] = kv_cache
        if len(self._seen) < len(self.layer_names):
            return
        caches = [self._seen[n] for n in self.layer_names]
        keys = [cache[..., : self.head_size] for cache in caches]
        if self.stack is None or not self.stack.holds(keys):
            if capturing:
                raise RuntimeError("LagKV: the KV caches were reallocated during graph capture")
            self.stack = LayerStack.of(keys, [cache[..., self.head_size :] for cache in caches])
        self.compiled = True
        timer = stats.DEVICE_TIMER.time() if keys[0].is_cuda else stats.COMPACTION_SECONDS.time()
        with timer:
            compress_layers(
                self.stack, plan.part_blocks, plan.ref_blocks, plan.rule, active=plan.active
            )
        self._step, self._seen = None, {}
