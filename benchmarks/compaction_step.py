"""LagKV's compaction of one engine step: select and compact of every layer, for every request
that completes a partition, launched as the CUDA backend launches them
(``kernels.compress_layers``), at a model's real shape, against the bytes it must move.

    python -m benchmarks.compaction_step --json out/compaction_step.json   # default model, GPU
    python -m benchmarks.compaction_step --layers 32 --kv-heads 8 --head-dim 128 --lag 1024
    TRITON_INTERPRET=1 python -m benchmarks.compaction_step --smoke        # tiny, on a CPU

The caches are vLLM's FlashAttention layout (``[2, blocks, block, kv heads, head dim]`` per
layer, every layer alike), bf16, partitions on shuffled blocks. Defaults: the default model
(30 layers, 3 KV heads of 64), S32 L256 r0.25, blocks of 16; rows 1, 32 and 128 (a decode step
where one request compresses, a prefill step of a batch). Per row count: the median time of the
whole call, the GPU time of each kernel (torch profiler), and the bytes that must move (partitions
p and p+1 of K and V read, the kept rows written) against a device-to-device copy's bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from benchmarks.kernels import copy_bandwidth, timed_ms
from lrsa_serve.config import LagKVConfig
from lrsa_serve.kernels import LayerStack, compress_layers

KERNELS = ("_channels_kernel", "_top_keep_kernel", "_compact_kernel")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--sink", type=int, default=32)
    parser.add_argument("--lag", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, runs on a CPU")
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.kv_heads, args.head_dim, args.sink, args.lag = 2, 2, 16, 16, 64
        args.rows = [1, 2]
    return args


class StepCaches:
    """``layers`` layers' paged caches holding partitions p and p+1 of ``rows`` requests on
    shuffled blocks (the same blocks in every layer, as the engine's block tables are)."""

    def __init__(self, args: argparse.Namespace, rows: int, device: torch.device) -> None:
        self.rule = LagKVConfig(sink=args.sink, lag=args.lag, ratio=args.ratio).rule
        per_part = args.lag // args.block_size
        blocks = rows * 2 * per_part + 8
        gen = torch.Generator(device=device).manual_seed(rows)
        shape = (args.layers, 2, blocks, args.block_size, args.kv_heads, args.head_dim)
        self.kv = torch.randn(shape, device=device, generator=gen).to(torch.bfloat16)
        # [blocks, block, heads, dim] -> the kernels' [blocks, heads, block, dim] view
        keys = [self.kv[i, 0].transpose(1, 2) for i in range(args.layers)]
        values = [self.kv[i, 1].transpose(1, 2) for i in range(args.layers)]
        self.stack = LayerStack.of(keys, values)
        order = torch.randperm(blocks, device=device, generator=gen)[: rows * 2 * per_part]
        table = order.view(rows, 2 * per_part).to(torch.int32)
        self.part, self.ref = table[:, :per_part], table[:, per_part:]
        self.rows, self.args = rows, args

    def compress(self) -> torch.Tensor:
        return compress_layers(self.stack, self.part, self.ref, self.rule, use_triton=True)

    def must_move_bytes(self) -> int:
        """Partitions p and p+1 of K and V read once, the kept K and V rows written once."""
        a = self.args
        rows = self.rows * a.layers * a.kv_heads * (2 * 2 * a.lag + 2 * self.rule.keep)
        return rows * a.head_dim * self.kv.element_size()


def kernel_us(caches: StepCaches, calls: int = 10) -> dict[str, float]:
    """GPU microseconds per call of each kernel (torch profiler, summed over its launches)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            caches.compress()
        torch.cuda.synchronize()
    out = dict.fromkeys(KERNELS, 0.0)
    for event in prof.key_averages():
        for name in KERNELS:
            if name in event.key:
                out[name] += event.device_time_total / calls
    return out


def measure(args: argparse.Namespace, rows: int, device: torch.device, copy: float) -> dict:
    caches = StepCaches(args, rows, device)
    ms = timed_ms(caches.compress, device)
    moved = caches.must_move_bytes()
    row = {"rows": rows, "ms": ms, "bytes": moved, "GBps": moved / (ms * 1e-3) / 1e9}
    row["copy_fraction"] = row["GBps"] / copy
    if device.type == "cuda":
        row["kernel_us"] = kernel_us(caches)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("compaction_step: needs a CUDA GPU (or --smoke under TRITON_INTERPRET=1)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    copy = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 20)) / 1e9
    rule = LagKVConfig(sink=args.sink, lag=args.lag, ratio=args.ratio).rule
    rows = [measure(args, r, device, copy) for r in args.rows]
    print(
        f"{name}, {args.layers} layers x {args.kv_heads} KV heads x {args.head_dim}, bf16, "
        f"block {args.block_size}, S{args.sink} L{args.lag} keep {rule.keep}; "
        f"copy {copy:.0f} GB/s (read + write)"
    )
    print("| rows | ms | MB to move | GB/s | of copy BW | " + " | ".join(KERNELS) + " (us) |")
    print("|---|---|---|---|---|" + "---|" * len(KERNELS))
    for r in rows:
        kernels = r.get("kernel_us", {})
        cells = " | ".join(f"{kernels[k]:.0f}" if k in kernels else "-" for k in KERNELS)
        print(
            f"| {r['rows']} | {r['ms']:.3f} | {r['bytes'] / 1e6:.1f} | {r['GBps']:.0f} "
            f"| {r['copy_fraction']:.2f} | {cells} |"
        )
    if args.json:
        report = {"device": name, "torch": torch.__version__, "args": vars(args), "rows": rows}
        report["copy_GBps"], report["keep"] = copy, rule.keep
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
