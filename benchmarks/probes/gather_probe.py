"""Packing one layer's key rows with torch at the 0.5B model's 32K shape: ``gather`` (what
``lrsa_varlen`` used), ``index_select`` and ``embedding`` (sort-based backward), fwd+bwd time,
and how far ``gather``'s bf16 atomic backward is from float32 sums (what ``pack_rows`` fixed).

Needs CUDA. Ran on the GPU machine from the repo root (notes/training.md section 2):

    python3 benchmarks/probes/gather_probe.py
"""

import functools

import torch
import torch.nn.functional as F
from common import cuda_ms, packed_layer

n, h, d = 32768, 2, 64
dev = "cuda"
k = torch.randn(1, h, n, d, device=dev, dtype=torch.bfloat16)
kt = torch.randn(1, n, h, d, device=dev, dtype=torch.bfloat16).transpose(1, 2)
index = packed_layer(k, k)[-1]  # [1, Tk, h]
tk = index.shape[1]
g = torch.randn(tk, h, d, device=dev, dtype=torch.bfloat16)


def current(src):
    x = src.detach().requires_grad_()
    idx = index[..., None].expand(-1, -1, -1, d)
    out = x.transpose(1, 2).gather(1, idx).reshape(-1, h, d)
    out.backward(g)
    return x.grad


def rows(src):  # index_select over (token, head) rows of a token-major copy
    x = src.detach().requires_grad_()
    flat = x.transpose(1, 2).reshape(n * h, d)
    ridx = (index[0] * h + torch.arange(h, device=dev)).flatten()
    out = flat.index_select(0, ridx).view(tk, h, d)
    out.backward(g)
    return x.grad


def emb(src):  # embedding: deterministic sort-based backward
    x = src.detach().requires_grad_()
    flat = x.transpose(1, 2).reshape(n * h, d)
    ridx = (index[0] * h + torch.arange(h, device=dev)).flatten()
    out = F.embedding(ridx, flat).view(tk, h, d)
    out.backward(g)
    return x.grad


ref = current(k).float()
for name, fn in [
    ("gather+scatter_add", current),
    ("index_select+index_add", rows),
    ("embedding (sort bwd)", emb),
]:
    for lay, src in (("heads", k), ("tokens", kt)):
        err = (fn(src).float() - (current(src).float())).abs().max().item()
        ms = cuda_ms(functools.partial(fn, src), reps=30)
        print(f"{name:26} {lay:6}: {ms:.3f} ms fwd+bwd (max diff vs gather {err:.2e})", flush=True)
# fp32 accumulation error of the current bf16 scatter: vs an fp32 reference
x = k.detach().float().requires_grad_()
x.transpose(1, 2).gather(1, index[..., None].expand(-1, -1, -1, d)).reshape(-1, h, d).backward(
    g.float()
)
for name, fn in [("gather+scatter_add", current), ("embedding (sort bwd)", emb)]:
    got = fn(k).float()
    rel = ((got - x.grad).norm() / x.grad.norm()).item()
    print(f"{name:26}: relative error of the K gradient vs fp32 accumulation {rel:.2e}")
