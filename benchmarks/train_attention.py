"""LRSA attention (the varlen path) vs dense causal SDPA, fwd+bwd, bf16.

    python -m benchmarks.train_attention --out results.json

One attention layer at 8K/16K/32K tokens on fresh random inputs, CUDA-event medians; what each
row means and the results: docs/training.md ("One attention layer"). ``--impls``: ``varlen``
(the whole training layer, selection included), ``varlen:K`` (the same on kernel K, e.g. ``fa4``
or ``flash``), ``varlen_attn`` (without the selection). Also reported: the visible-pair ratio
(the FLOP ratio the mask allows) and the selection alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lrsa_serve import lagkv
from lrsa_serve.config import LagKVConfig
from lrsa_serve.training.attention import dispatch, sequence_select
from lrsa_serve.training.attention.varlen import kernel_applies, lrsa_varlen_attention, packing_for


def median_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def inputs(n: int, heads: tuple[int, int], dim: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, heads[0], n, dim, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, heads[1], n, dim, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(1, heads[1], n, dim, device="cuda", generator=g, dtype=torch.bfloat16)
    grad = torch.randn(1, n, heads[0], dim, device="cuda", generator=g, dtype=torch.bfloat16)
    return [t.requires_grad_() for t in (q, k, v)], grad


def fwd_bwd(attn, qkv, grad):
    def run():
        out = attn(*qkv)
        torch.autograd.grad(out, qkv, grad)

    return run


def dense_gqa(q, k, v):
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)


def dense_flash(q, k, v):  # FlashAttention-2 forced: the kernel the varlen path uses
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return dense_gqa(q, k, v)


def dense_fa4(q, k, v):  # FlashAttention-4 dense causal: the kernel the fa4 varlen path uses
    from flash_attn.cute import flash_attn_func

    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return flash_attn_func(q, k, v, causal=True)[0]


def dense_repeat(q, k, v):  # HF's path when SDPA's GQA flag cannot be used
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--heads", type=int, nargs=2, default=[12, 2])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--sink", type=int, default=16)
    parser.add_argument("--lag", type=int, default=1024)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--impls", nargs="+", default=["varlen"])
    parser.add_argument("--out", default="train_attention.json")
    args = parser.parse_args()
    cfg = LagKVConfig(sink=args.sink, lag=args.lag, ratio=args.ratio)
    heads = tuple(args.heads)
    scale = args.dim**-0.5
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "settings": cfg.model_dump() | {"heads": heads, "dim": args.dim},
        "rows": [],
    }

    rule = cfg.rule

    def varlen_with(kernel: str):  # the varlen path with this kernel ("varlen:KERNEL")
        return lambda q, k, v: dispatch.lrsa_varlen(q, k, v, rule, scale, kernel=kernel)

    impls = {"varlen": varlen_with("auto")}
    for name in args.impls:
        if name.startswith("varlen:"):
            impls[name] = varlen_with(name.removeprefix("varlen:"))

    def save():
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    # dense SDPA (both GQA forms) vs LRSA, plus selection alone
    for n in args.lengths:
        qkv, grad = inputs(n, heads, args.dim, seed=n)
        row = {"n": n}
        row["dense_sdpa_gqa_ms"] = median_ms(fwd_bwd(dense_gqa, qkv, grad))
        row["dense_sdpa_repeat_ms"] = median_ms(fwd_bwd(dense_repeat, qkv, grad))
        try:
            row["dense_flash_ms"] = median_ms(fwd_bwd(dense_flash, qkv, grad))
        except RuntimeError as e:  # no flash kernel for this shape/dtype
            row["dense_flash_ms"] = None
            print(f"n={n} dense flash: failed {e!r}"[:300], flush=True)
        row["dense_fa4_ms"] = None
        if kernel_applies("fa4", qkv[0]):
            row["dense_fa4_ms"] = median_ms(fwd_bwd(dense_fa4, qkv, grad))
        k, v = qkv[1].detach(), qkv[2].detach()
        kept = sequence_select.select_kept(k, v, rule)

        def varlen_attn(q, k, v, kept=kept):  # the varlen path without the selection
            return lrsa_varlen_attention(q, k, v, rule, scale, kept=kept)

        impls["varlen_attn"] = varlen_attn
        dense = min(row["dense_sdpa_gqa_ms"], row["dense_sdpa_repeat_ms"])
        # fwd 4*pairs*d*Hq flops, bwd 2.5x fwd; pairs: those the LagKV rule lets attend
        flops = 3.5 * 4 * args.dim * heads[0]
        pairs = packing_for(n, rule).visible_pairs()
        row["dense_tflops"] = flops * n * (n + 1) / 2 / (dense * 1e-3) / 1e12
        for impl in args.impls:
            try:
                row[f"{impl}_ms"] = median_ms(fwd_bwd(impls[impl], qkv, grad))
            except Exception as e:  # report and go on with the other paths
                row[f"{impl}_ms"] = None
                print(f"n={n} {impl}: failed {e!r}"[:300], flush=True)
                continue
            print(f"n={n} {impl}: {row[f'{impl}_ms']:.2f} ms (dense {dense:.2f})", flush=True)
            row[f"{impl}_speedup"] = dense / row[f"{impl}_ms"]
            row[f"{impl}_tflops"] = flops * pairs / row[f"{impl}_ms"] / 1e9
            if row["dense_flash_ms"]:
                row[f"{impl}_speedup_vs_flash"] = row["dense_flash_ms"] / row[f"{impl}_ms"]
            if row["dense_fa4_ms"]:
                row[f"{impl}_speedup_vs_fa4"] = row["dense_fa4_ms"] / row[f"{impl}_ms"]
        main = args.impls[0]
        row["lrsa_ms"], row["speedup_vs_best_dense"] = row[f"{main}_ms"], row.get(f"{main}_speedup")
        row["select_ms"] = median_ms(lambda: sequence_select.select_kept(k, v, rule))  # noqa: B023
        with torch.no_grad():
            row["select_eager_ms"] = median_ms(lambda: lagkv.select_all(k, v, rule))  # noqa: B023
        row["visible_pair_ratio"] = n * (n + 1) / 2 / pairs
        result["rows"].append(row)
        save()
        print(json.dumps(row), flush=True)
        del qkv, grad
        torch.cuda.empty_cache()

    result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    save()
    print(
        f"\n{result['device']}, torch {result['torch']}, {cfg.short()}, heads {heads}, "
        f"d={args.dim}, bf16, fwd+bwd, median ms"
    )
    head = "".join(f"{impl:>12} {'speedup':>8}" for impl in args.impls)
    print(
        f"{'n':>6} {'dense gqa':>10} {'dense rep':>10} {'dense fa2':>10} {'dense fa4':>10}{head} "
        f"{'mask ratio':>10} {'select':>7} {'sel eager':>9}"
    )
    for r in result["rows"]:
        cells = "".join(
            f"{r[f'{i}_ms']:>12.2f} {r[f'{i}_speedup']:>7.2f}x"
            if r.get(f"{i}_ms")
            else f"{'-':>12} {'-':>8}"
            for i in args.impls
        )
        flash = "".join(
            f" {r[key]:>10.2f}" if r.get(key) else f" {'-':>10}"
            for key in ("dense_flash_ms", "dense_fa4_ms")
        )
        print(
            f"{r['n']:>6} {r['dense_sdpa_gqa_ms']:>10.2f} {r['dense_sdpa_repeat_ms']:>10.2f}"
            f"{flash}{cells} {r['visible_pair_ratio']:>9.2f}x {r['select_ms']:>7.2f} "
            f"{r['select_eager_ms']:>9.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
