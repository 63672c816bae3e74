"""One LRSA layer at the 0.5B model's 32K shape, fwd+bwd: the packing alone (``gather`` vs
``pack_rows``), then ``lrsa_varlen`` with each selection x packing pair, and dense SDPA.

Needs CUDA (FA4 where installed). Ran on the GPU machine from the repo root
(notes/training.md section 2, notes/raw_select_pack/layer_probe.txt):

    python3 benchmarks/probes/layer_probe.py
"""

import torch
from common import RULE, N, cuda_ms, packed_layer

from lrsa_serve.training.attention import dispatch
from lrsa_serve.training.attention import varlen as lv
from lrsa_serve.training.attention.pack_rows import pack_rows

dev = "cuda"
q = torch.randn(1, N, 14, 64, device=dev, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
k = torch.randn(1, N, 2, 64, device=dev, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
v = torch.randn(1, N, 2, 64, device=dev, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
g = torch.randn(1, N, 14, 64, device=dev, dtype=torch.bfloat16)
kept, packing, _, _, _, index = packed_layer(k, v)


def pack_torch():
    idx = index[..., None].expand(-1, -1, -1, 64)
    kk = k.transpose(1, 2).gather(1, idx)
    vv = v.transpose(1, 2).gather(1, idx)
    torch.autograd.backward([kk, vv], [torch.ones_like(kk), torch.ones_like(vv)])


def pack_triton():
    kk, vv = pack_rows(k, v, index, kept, packing)
    torch.autograd.backward([kk, vv], [torch.ones_like(kk), torch.ones_like(vv)])


print(f"pack fwd+bwd torch gather : {cuda_ms(pack_torch):.3f} ms", flush=True)
print(f"pack fwd+bwd triton       : {cuda_ms(pack_triton):.3f} ms", flush=True)
for select, pack in [
    ("compiled", "torch"),
    ("triton", "torch"),
    ("triton", "triton"),
    ("compiled", "torch"),
    ("triton", "triton"),
]:
    # The trainer picks both by length (Triton from 32K on CUDA); each pair is forced here.
    lv.packer_for = lambda key, pack=pack: pack

    def whole(select=select):
        with torch.no_grad():
            kept = dispatch.selector(select)(k, v, RULE)
        out = lv.lrsa_varlen_attention(q, k, v, RULE, kept=kept)
        out.backward(g)

    ms = cuda_ms(whole)
    print(f"lrsa_varlen fwd+bwd select={select:8} pack={pack:6}: {ms:.3f} ms", flush=True)


def dense():
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out.backward(g.transpose(1, 2))


print(f"dense sdpa fwd+bwd: {cuda_ms(dense):.3f} ms")
