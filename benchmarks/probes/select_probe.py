"""LagKV selection per layer at the 0.5B model's K/V shape (2 KV heads of 64, bf16, 16K and
32K, both K/V layouts): the serving engine's Triton kernel (``sequence_select``) vs
``lagkv.select_all`` compiled and eager, wall and queued GPU time, and whether they keep the same
positions.

Needs CUDA. Ran on the GPU machine from the repo root (notes/training.md section 2,
notes/raw_select_pack/selection_probe.txt):

    python3 benchmarks/probes/select_probe.py
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lrsa_serve.config import LagKVConfig  # noqa: E402
from lrsa_serve.training.attention import dispatch  # noqa: E402

cfg = LagKVConfig(sink=16, lag=1024, ratio=0.25)
rule = dispatch.Rule.of(cfg)
for n in (16384, 32768):
    k = torch.randn(1, 2, n, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kt = torch.randn(1, n, 2, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    vt = torch.randn_like(kt)
    kept = {}
    for name in ("triton", "compiled", "eager"):
        select = dispatch.selector(name)  # the trainer picks by length; each is timed here
        for kk, vv, lay in ((k, v, "heads"), (kt, vt, "tokens")):
            for _ in range(3):
                out = select(kk, vv, rule)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(50):
                select(kk, vv, rule)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t) / 50 * 1e3
            kept[name, lay] = out
            # launch-free GPU time: CUDA events around a single call after a busy kernel
            a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a @ a
            s.record()
            select(kk, vv, rule)
            e.record()
            torch.cuda.synchronize()
            gpu_ms = s.elapsed_time(e)
            print(f"n={n} {lay:6} {name:8}: {ms:.3f} ms/call wall, {gpu_ms:.3f} ms GPU (queued)")
    for lay in ("heads", "tokens"):
        same = (kept["triton", lay] == kept["eager", lay]).all(-1).float().mean().item()
        print(f"n={n} {lay}: triton == eager torch on {100 * same:.1f}% of (head, partition) rows")
