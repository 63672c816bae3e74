"""One LRSA layer at the 0.5B model's 32K shape, fwd+bwd: the packing alone (``gather`` vs
``pack_rows``), then ``lrsa_varlen`` with each selection x packing pair, and dense SDPA.

Needs CUDA (FA4 where installed). Ran on the GPU machine from the repo root
(notes/training.md section 2, notes/raw_select_pack/layer_probe.txt):

    python3 benchmarks/probes/layer_probe.py
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lrsa_serve.config import LagKVConfig  # noqa: E402
from lrsa_serve.kernels import lrsa_attention as la  # noqa: E402
from lrsa_serve.kernels import lrsa_varlen as lv  # noqa: E402
from lrsa_serve.kernels.pack_rows import pack_rows  # noqa: E402

n = 32768
cfg = LagKVConfig(sink=16, lag=1024, ratio=0.25)
rule = la.Rule.of(cfg)
dev = "cuda"


def bench(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps


q = torch.randn(1, n, 14, 64, device=dev, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
k = torch.randn(1, n, 2, 64, device=dev, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
v = torch.randn(1, n, 2, 64, device=dev, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
g = torch.randn(1, n, 14, 64, device=dev, dtype=torch.bfloat16)
kept = la.select_kept(k, v, rule)
packing = lv.Packing.of(n, rule)
cu_q, cu_k, template = lv._tensors(packing, 1, "cuda:0")
index = lv.key_index(kept, packing, template)


def pack_torch():
    idx = index[..., None].expand(-1, -1, -1, 64)
    kk = k.transpose(1, 2).gather(1, idx)
    vv = v.transpose(1, 2).gather(1, idx)
    torch.autograd.backward([kk, vv], [torch.ones_like(kk), torch.ones_like(vv)])


def pack_triton():
    kk, vv = pack_rows(k, v, index, kept, packing)
    torch.autograd.backward([kk, vv], [torch.ones_like(kk), torch.ones_like(vv)])


print(f"pack fwd+bwd torch gather : {bench(pack_torch):.3f} ms", flush=True)
print(f"pack fwd+bwd triton       : {bench(pack_triton):.3f} ms", flush=True)
for select, pack in [
    ("compiled", "torch"),
    ("triton", "torch"),
    ("triton", "triton"),
    ("compiled", "torch"),
    ("triton", "triton"),
]:
    os.environ["LRSA_SELECT"], os.environ["LRSA_PACK"] = select, pack

    def whole():
        out = la.lrsa_varlen(q, k, v, cfg)
        out.backward(g)

    print(f"lrsa_varlen fwd+bwd select={select:8} pack={pack:6}: {bench(whole):.3f} ms", flush=True)


def dense():
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out.backward(g.transpose(1, 2))


print(f"dense sdpa fwd+bwd: {bench(dense):.3f} ms")
