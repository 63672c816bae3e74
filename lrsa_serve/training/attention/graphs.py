"""CUDA graphs of the LRSA op's calls: each call shape captured once, replayed for every layer.

Why: at 8K tokens one ``lrsa::varlen`` call does less GPU work than its launches cost the host
(H100, FlashAttention-2: ~1 ms of host time per call for ~0.4 ms of kernels; the selection, the
items' index, the packing, the kernel), so the training step waited on Python
(docs/training.md). A replayed graph is one launch, plus copying the inputs into the graph's
static buffers and the outputs out of them.

Every layer of a model calls the op with the same shapes, so one capture serves them all. A call
runs eagerly the first time its key is seen (that run compiles Triton and inductor kernels and
fills the packing caches, none of which may happen inside a capture), already on the static
buffers, and is captured the second time. A key is the call's name, its tensors' shapes,
strides, dtypes and device, and its numbers (rule, scale, kernel). At most ``MAX_GRAPHS`` keys
are kept, the least recently used going first with its graph's memory: the trainer's length
buckets give a run a few shapes, and a shape seen in one step only still captures at its second
layer, which costs less than the launches the later layers save.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

MAX_GRAPHS = 12

Tensors = tuple[torch.Tensor, ...]


@dataclass
class _Call:
    """One key's graph: its static inputs, the outputs its replay writes, and the graph."""

    uses: int = 0
    inputs: Tensors = ()
    outputs: Tensors = ()
    graph: torch.cuda.CUDAGraph | None = field(default=None, repr=False)


def _layout(x: torch.Tensor) -> tuple:
    return tuple(x.shape), x.stride(), x.dtype, x.device


class CallGraphs:
    """Captured calls, by key; ``run`` runs one. ``max_graphs`` 0 runs every call eagerly;
    ``remedy`` ends the error a failed capture raises (how to run without graphs)."""

    def __init__(self, max_graphs: int = MAX_GRAPHS, remedy: str = "") -> None:
        self.max_graphs = max_graphs
        self.remedy = remedy
        self._calls: OrderedDict[Hashable, _Call] = OrderedDict()

    def __len__(self) -> int:
        return sum(call.graph is not None for call in self._calls.values())

    def run(
        self, name: str, fn: Callable[..., Tensors], tensors: Tensors, numbers: Hashable
    ) -> Tensors:
        """``fn(*tensors)``: eagerly on the key's first call, then from its captured graph.
        ``fn`` must read nothing but its arguments and ``numbers`` (which key the call), and
        return tensors it allocates (never its arguments); what it returns here is always the
        caller's to keep."""
        if self.max_graphs == 0:
            return fn(*tensors)
        if torch.cuda.is_current_stream_capturing():
            # A caller's own capture (a whole training step) holds this call: run it there, on
            # fresh copies laid out as the static inputs its first call ran on (a compiled
            # part's guard failing inside a capture would recompile there); the caller's graph
            # owns them.
            return fn(*(torch.empty_like(x).copy_(x) for x in tensors))
        key = (name, numbers, *(_layout(x) for x in tensors))
        call = self._calls.get(key)
        if call is None:
            call = self._calls[key] = _Call()
            self._evict()
        self._calls.move_to_end(key)
        call.uses += 1
        if call.uses == 1:
            # The static inputs from the first call on, so that the eager run and the capture
            # see the same tensors: a compiled function guards on requires_grad, strides and
            # alignment, and a guard failing inside the capture would recompile there.
            call.inputs = tuple(torch.empty_like(x) for x in tensors)
        for static, x in zip(call.inputs, tensors, strict=True):
            static.copy_(x)
        if call.uses == 1:
            return fn(*call.inputs)
        if call.graph is None:
            try:
                self._capture(call, fn)
            except Exception as err:  # the CUDA error alone does not say which call, or why
                first_line = next(iter(str(err).strip().splitlines()), "")
                raise RuntimeError(  # one line: CUDA's own message runs on with links
                    f"capturing the call {name!r} as a CUDA graph failed "
                    f"({type(err).__name__}: {first_line}){self.remedy}"
                ) from err
        call.graph.replay()
        return tuple(out.clone() for out in call.outputs)

    def _capture(self, call: _Call, fn: Callable[..., Tensors]) -> None:
        graph = torch.cuda.CUDAGraph()
        # capture_begin itself, not torch.cuda.graph, which synchronizes the device and empties
        # the allocator's cache first: a shape first seen mid-run would cost every step that.
        # thread_local: the backward captures in autograd's device thread.
        device = call.inputs[0].device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                call.outputs = tuple(fn(*call.inputs))
            finally:
                graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(stream)
        call.graph = graph

    def _evict(self) -> None:
        while len(self._calls) > self.max_graphs:
            self._calls.popitem(last=False)

    def clear(self) -> None:
        self._calls.clear()
