"""LagKV's Prometheus series, recorded where the facts are: the KV manager (engine-core process)
knows resident and evicted tokens, the attention impl (worker processes) times compaction.

With ``PROMETHEUS_MULTIPROC_DIR`` set before the engine starts (``lrsa serve`` does), every
process writes its samples there and the server's ``/metrics`` aggregates them; in-process
engines (tests, the Python API) record into this process's default registry.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from prometheus_client import Counter, Gauge, Histogram

RESIDENT_TOKENS = Gauge(
    "lagkv_resident_kv_tokens",
    "KV entries held per layer and KV head by running requests (after eviction)",
    multiprocess_mode="livesum",
)
LOGICAL_TOKENS = Gauge(
    "lagkv_logical_kv_tokens",
    "Tokens processed by running requests (what an uncompressed cache would hold)",
    multiprocess_mode="livesum",
)
COMPRESSION_RATIO = Gauge(
    "lagkv_compression_ratio",
    "Logical / resident KV tokens over running requests (1 when none run)",
    multiprocess_mode="mostrecent",
)
SETTINGS_INFO = Gauge(
    "lagkv_settings_info",
    "LagKV settings the engine runs with (labels); value 1",
    ["sink", "lag", "ratio", "keep", "score_v_ratio"],
    multiprocess_mode="mostrecent",
)
EVICTED_TOKENS = Counter(
    "lagkv_evicted_tokens",
    "Token positions evicted by compaction (per sequence, counted once for all layers and heads)",
)
COMPRESSED_PARTITIONS = Counter(
    "lagkv_compressed_partitions", "Lag partitions compacted to their kept tokens"
)
FREED_BLOCKS = Counter("lagkv_freed_blocks", "KV blocks returned to the pool by compaction")
COMPACTION_SECONDS = Histogram(
    "lagkv_compaction_seconds",
    "Time to score and compact completed partitions: per layer on the CPU, per step "
    "(all layers of a KV-cache group) on CUDA",
    buckets=(1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0),
)


class DeviceTimer:
    """Times a step's compaction on a CUDA stream with events and observes it once the GPU
    has finished it, polled at later calls: the step never waits for the GPU. Work inside a
    captured CUDA graph is not timed (events cannot be recorded there)."""

    def __init__(self) -> None:
        self.pending: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()

    @contextmanager
    def time(self) -> Iterator[None]:
        if torch.cuda.is_current_stream_capturing():
            yield
            return
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.pending.append((start, end))
        while self.pending and self.pending[0][1].query():
            begun, done = self.pending.popleft()
            COMPACTION_SECONDS.observe(begun.elapsed_time(done) / 1e3)


DEVICE_TIMER = DeviceTimer()


def record_compactions(partitions: int, evicted_tokens: int) -> None:
    """Worker side, once per step: partitions whose compaction this step planned. Every worker
    plans the same ones (tensor-parallel ranks hold other heads, pipeline stages other layers),
    so one worker counts: the first rank of the first stage."""
    from vllm.distributed import parallel_state

    if parallel_state.model_parallel_is_initialized():
        groups = parallel_state.get_tp_group(), parallel_state.get_pp_group()
        if not all(group.is_first_rank for group in groups):
            return
    COMPRESSED_PARTITIONS.inc(partitions)
    EVICTED_TOKENS.inc(evicted_tokens)


def record_occupancy(resident: int, logical: int) -> None:
    RESIDENT_TOKENS.set(resident)
    LOGICAL_TOKENS.set(logical)
    COMPRESSION_RATIO.set(logical / resident if resident else 1.0)
