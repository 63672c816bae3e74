"""Where a 32K training step goes: one LRSA layer's pieces at the 0.5B model's shape (14 q / 2 kv
heads of 64; selection, packing, FA4 on the items, dense SDPA and dense FA4), then a profile of a
whole dense and LRSA step (compiled layers, fused AdamW, no checkpointing).

Needs CUDA and the optional flash-attn-4 package. Ran on the GPU machine from the repo root
(notes/training.md section 2 cites its output, notes/raw_select_pack/profile_32k.txt):

    python3 benchmarks/probes/step_profile.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from common import CFG, RULE, N, compiled_half_billion, cuda_ms, packed_layer, profiled_steps

from lrsa_serve.training import model as model_mod
from lrsa_serve.training.attention import dispatch
from lrsa_serve.training.attention import varlen as lv

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_model import qa_batch  # noqa: E402

DEVICE = torch.device("cuda")


def layer_pieces() -> None:
    bf16 = dict(device=DEVICE, dtype=torch.bfloat16)
    q = torch.randn(1, 14, N, 64, **bf16, requires_grad=True)
    k = torch.randn(1, 2, N, 64, **bf16, requires_grad=True)
    v = torch.randn(1, 2, N, 64, **bf16, requires_grad=True)
    grad = torch.randn(1, N, 14, 64, **bf16)
    kept, packing, cu_q, cu_k, template, index = packed_layer(k, v)
    index = index[..., None].expand(-1, -1, -1, 64)
    fa4 = lv._fa4()
    max_q, max_k = max(packing.q_lens), max(packing.k_lens)
    q_items = q.detach().transpose(1, 2).reshape(N, 14, 64).requires_grad_()
    k_items = k.detach().transpose(1, 2).gather(1, index).reshape(-1, 2, 64).requires_grad_()
    v_items = v.detach().transpose(1, 2).gather(1, index).reshape(-1, 2, 64).requires_grad_()
    print(f"key rows {packing.key_rows}, items {len(packing.q_lens)}, max lq {max_q} lk {max_k}")

    def items(pack_gqa: bool, backward: bool):
        def run():
            with torch.set_grad_enabled(backward):
                out = fa4.flash_attn_varlen_func(
                    q_items, k_items, v_items, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                    max_seqlen_q=max_q, max_seqlen_k=max_k, causal=True, pack_gqa=pack_gqa,
                )[0]  # fmt: skip
            if backward:
                out.backward(grad[0])

        return run

    def gathers(backward: bool):
        def run():
            with torch.set_grad_enabled(backward):
                packed = [x.transpose(1, 2).gather(1, index) for x in (k, v)]
            if backward:
                torch.autograd.backward(packed, [torch.ones_like(p) for p in packed])

        return run

    def whole():
        dispatch.lrsa_varlen(q, k, v, CFG).backward(grad)

    def dense():
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True
        )
        out.backward(grad.transpose(1, 2))

    def dense_fa4():
        leaves = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)]
        fa4.flash_attn_func(*leaves, causal=True)[0].backward(grad)

    for name, fn in [
        ("selection", lambda: dispatch.select_kept(k, v, RULE)),
        ("key_index", lambda: lv.key_index(kept, packing, template)),
        ("gathers fwd", gathers(False)),
        ("gathers fwd+bwd", gathers(True)),
        ("items fa4 fwd pack_gqa=True", items(True, False)),
        ("items fa4 fwd pack_gqa=False", items(False, False)),
        ("items fa4 fwd+bwd pack_gqa=True", items(True, True)),
        ("items fa4 fwd+bwd pack_gqa=False", items(False, True)),
        ("lrsa_varlen whole fwd+bwd", whole),
        ("dense sdpa fwd+bwd", dense),
        ("dense fa4 fwd+bwd", dense_fa4),
    ]:
        print(f"{name:36}: {cuda_ms(fn):7.3f} ms", flush=True)


def whole_steps() -> None:
    model, optimizer, autocast = compiled_half_billion(DEVICE)
    model_mod.prepare_for_training(model, False)
    batch = qa_batch(N, model.config.vocab_size, 512, DEVICE)
    for attention in ["dense", "lrsa"]:
        model_mod.set_attention(model, attention, CFG)
        seconds, table = profiled_steps(
            model, optimizer, batch, autocast, "self_cuda_time_total", 30, 90
        )
        print(f"{attention}: {seconds * 1e3:.1f} ms/step\n---- {attention}\n{table}", flush=True)


if __name__ == "__main__":
    layer_pieces()  # its tensors are freed before the model is built
    torch.cuda.empty_cache()
    whole_steps()
