"""LagKV select + compact on the GPU against a decode step's attention, per layer.

    python -m benchmarks.kernels --json out/kernels.json        # a CUDA GPU
    TRITON_INTERPRET=1 python -m benchmarks.kernels --smoke     # tiny shapes, runs on a CPU

The layer, what each column times and the results: docs/benchmarks.md ("Paged select and compact
kernels"). The decode attention is torch SDPA with each GQA group's query heads as rows over its
KV head's contiguous keys (a stand-in for paged decode attention, which reads the same bytes);
select and compact run on a paged cache in vLLM's Triton layout with shuffled block tables, B
requests each compressing one partition.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import timeit
from collections.abc import Callable

import torch

from lrsa_serve import lagkv
from lrsa_serve.config import LagKVConfig
from lrsa_serve.engine.layout import BlockGeometry
from lrsa_serve.kernels import compact, naive, select

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, SINK, RATIO = 32, 8, 128, 16, 16, 0.25
DTYPE = torch.bfloat16


def timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of fn: CUDA events via do_bench on a GPU, a host timer otherwise."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    return statistics.median(timeit.repeat(fn, number=1, repeat=3)) * 1e3


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(nbytes // 2, dtype=DTYPE, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timed_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3)


def decode_attention_ms(batch: int, tokens: int, device: torch.device) -> float:
    """One layer's decode step over `tokens` keys per sequence (see the module docstring)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = Q_HEADS // KV_HEADS
    q = torch.randn(batch, KV_HEADS, group, HEAD_DIM, dtype=DTYPE, device=device)
    k = torch.randn(batch, KV_HEADS, tokens, HEAD_DIM, dtype=DTYPE, device=device)
    v = torch.randn_like(k)
    backends = [SDPBackend.FLASH_ATTENTION] if device.type == "cuda" else [SDPBackend.MATH]

    def step() -> torch.Tensor:
        with sdpa_kernel(backends):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return timed_ms(step, device)


def geometry(lag: int) -> BlockGeometry:
    """The benchmark's LagKV settings at this lag, on blocks of ``BLOCK_SIZE``."""
    return BlockGeometry.of(LagKVConfig(sink=SINK, lag=lag, ratio=RATIO), BLOCK_SIZE)


class PagedLayer:
    """One layer's paged cache ([blocks, kv heads, block, 2 * head_dim], K|V packed) holding
    partitions p and p+1 of `requests` requests on shuffled blocks; each keeps `keep` rows."""

    def __init__(self, requests: int, lag: int, device: torch.device, gen: torch.Generator):
        per_part, self.keep = geometry(lag).part_blocks, geometry(lag).rule.keep
        num_blocks = requests * 2 * per_part + 64
        self.kv = torch.randn(
            num_blocks, KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM, device=device, generator=gen
        ).to(DTYPE)
        self.key, self.value = self.kv[..., :HEAD_DIM], self.kv[..., HEAD_DIM:]
        perm = torch.randperm(num_blocks, device=device, generator=gen)
        table = perm[: requests * 2 * per_part].view(requests, 2 * per_part).to(torch.int32)
        self.part, self.ref = table[:, :per_part], table[:, per_part:]
        self.requests, self.lag = requests, lag

    def must_move_bytes(self) -> int:
        """Partitions p and p+1 of K and V read once, kept K and V rows written once."""
        rows = self.requests * KV_HEADS * (2 * 2 * self.lag + 2 * self.keep)
        return rows * HEAD_DIM * self.kv.element_size()

    def selected(self) -> torch.Tensor:
        """The rows each request keeps of partition p (this package's select kernel)."""
        return select.select_kept(self.key, self.value, self.part, self.ref, self.keep)

    def compress(self) -> None:
        """select + compact, as a step where every request compresses runs them."""
        compact.compact_kept(self.key, self.value, self.part, self.selected())

    def compress_in_torch(self) -> None:
        """The same with the plain-torch path (``naive.py``)."""
        kept = naive.select_kept(self.key, self.value, self.part, self.ref, self.keep)
        naive.compact_kept(self.key, self.value, self.part, kept)


def compression_times(layer: PagedLayer, device: torch.device) -> dict[str, float]:
    kept = layer.selected()
    return {
        "select_ms": timed_ms(layer.selected, device),
        "compact_ms": timed_ms(
            lambda: compact.compact_kept(layer.key, layer.value, layer.part, kept), device
        ),
        "total_ms": timed_ms(layer.compress, device),
        "torch_ms": timed_ms(layer.compress_in_torch, device),
    }


def kernel_breakdown(layer: PagedLayer, device: torch.device) -> dict:
    """Where select + compact spend their time: GPU time per kernel (torch profiler, mean of 20
    calls), the whole of it replayed from a CUDA graph (no launch overhead), and the host time
    per call (Python + Triton launches, no synchronisation)."""
    out: dict = {"requests": layer.requests, "lag": layer.lag}
    layer.compress()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(50):
        layer.compress()
    out["host_us_per_call"] = (time.perf_counter() - start) / 50 * 1e6
    torch.cuda.synchronize()
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                layer.compress()
            torch.cuda.synchronize()
        for event in prof.key_averages():
            if event.device_time_total and event.count:
                out[f"us {event.key[:40]}"] = event.device_time_total / event.count
    except Exception as err:  # the numbers above stand without it
        out["profiler_error"] = repr(err)
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer.compress()
            layer.compress()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            layer.compress()
        out["graph_ms"] = timed_ms(graph.replay, device)
    except Exception as err:
        out["graph_error"] = repr(err)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write all numbers here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, runs on a CPU")
    args = parser.parse_args()

    if args.smoke:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        contexts, batches, lags, copy_bytes = [256, 512], [1, 2], [64], 1 << 20
    else:
        assert torch.cuda.is_available(), "needs a GPU (or --smoke)"
        device = torch.device("cuda")
        contexts, batches, lags, copy_bytes = [8192, 32768, 131072], [1, 32], [1024, 256], 1 << 30
    gen = torch.Generator(device=device).manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict = {
        "device": name,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "layer": dict(q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=str(DTYPE)),
        "block_size": BLOCK_SIZE,
        "sink": SINK,
        "ratio": RATIO,
    }
    copy_bw = copy_bandwidth(device, copy_bytes)
    report["copy_bandwidth_GBps"] = copy_bw / 1e9
    print(f"device {name}; copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)", flush=True)

    compression: dict[tuple[int, int], dict] = {}
    for lag in lags:
        for batch in batches:
            layer = PagedLayer(batch, lag, device, gen)
            times = compression_times(layer, device)
            moved = layer.must_move_bytes()
            times["bytes"] = moved
            times["GBps"] = moved / (times["total_ms"] * 1e-3) / 1e9
            times["copy_fraction"] = times["GBps"] * 1e9 / copy_bw
            compression[lag, batch] = times
            print(f"L={lag} B={batch}: {times}", flush=True)
            del layer
    report["compression"] = [
        {"lag": lag, "batch": batch, **times} for (lag, batch), times in compression.items()
    ]

    report["breakdown"] = []
    if device.type == "cuda":
        for batch in batches:
            layer = PagedLayer(batch, lags[0], device, gen)
            report["breakdown"].append(kernel_breakdown(layer, device))
            print(report["breakdown"][-1], flush=True)
            del layer

    rows = []
    for context in contexts:
        for batch in batches:
            full_ms = decode_attention_ms(batch, context, device)
            torch.cuda.empty_cache() if device.type == "cuda" else None
            for lag in lags:
                resident = lagkv.resident_tokens(context, geometry(lag).rule)
                lagkv_ms = decode_attention_ms(batch, resident, device)
                comp = compression[lag, batch]
                amortised = batch / lag * compression[lag, 1]["total_ms"]
                rows.append(
                    {
                        "context": context,
                        "batch": batch,
                        "lag": lag,
                        "resident": resident,
                        "attn_full_ms": full_ms,
                        "attn_lagkv_ms": lagkv_ms,
                        "select_ms": comp["select_ms"],
                        "compact_ms": comp["compact_ms"],
                        "compress_ms": comp["total_ms"],
                        "torch_ms": comp["torch_ms"],
                        "worst_step_pct": 100 * comp["total_ms"] / lagkv_ms,
                        "amortised_pct": 100 * amortised / lagkv_ms,
                        "copy_fraction": comp["copy_fraction"],
                    }
                )
                print(rows[-1], flush=True)
    report["rows"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)

    print()
    for r in report["breakdown"]:
        print(f"  breakdown B={r['requests']}: " + ", ".join(
            f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
        ))  # fmt: skip
    print()
    print(
        f"{name}, one layer, 32q/8kv heads x 128, bf16, block {BLOCK_SIZE}, sink {SINK}, "
        f"ratio {RATIO}; copy {copy_bw / 1e9:.0f} GB/s"
    )
    header = (
        f"{'ctx':>7} {'B':>3} {'L':>5} {'resident':>8} {'attn full':>9} {'attn lagkv':>10} "
        f"{'select':>7} {'compact':>7} {'sel+cmp':>7} {'torch':>7} {'worst%':>7} {'amort%':>7} "
        f"{'BW/copy':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['context']:>7} {r['batch']:>3} {r['lag']:>5} {r['resident']:>8} "
            f"{r['attn_full_ms']:>9.4f} {r['attn_lagkv_ms']:>10.4f} {r['select_ms']:>7.4f} "
            f"{r['compact_ms']:>7.4f} {r['compress_ms']:>7.4f} {r['torch_ms']:>7.3f} "
            f"{r['worst_step_pct']:>7.2f} {r['amortised_pct']:>7.3f} {r['copy_fraction']:>7.2f}"
        )
    print("times in ms (medians); worst% = sel+cmp / attn lagkv with every request compressing;")
    print("amort% = (B/L) * sel+cmp(B=1) / attn lagkv; BW/copy = must-move bytes / time / copy BW")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
