"""Whole-model training throughput: LRSA vs dense SDPA on a randomly initialised ~0.5B Qwen2.

    python -m benchmarks.train_model --out train_model.json

The trainer's own step (``loop.loss_sum``, backward, clip, its AdamW; decoder layers compiled on
CUDA) on one sequence with the loss on its last ``--target-tokens``; the setting and the results:
docs/training.md ("Whole-model training step"). Also: the share of the step spent in LagKV
selection (one layer's K/V timed alone, times layers), and with ``--floor`` the step with
attention replaced by nothing, from which the best speedup the mask allows. ``--lrsa-variants``:
the trainer's ``--lrsa-kernel`` choices (``auto``, ``fa4``, ``flash``, ...); ``--eager-calls``
the first of them without the op's CUDA graphs (``op.GRAPHS``), ``--triton-all-lengths`` with the
Triton selection and packing below their threshold too. ``--profile``: one
more step of each configuration under the torch profiler, to tell a host-bound step from a
GPU-bound one (``profiled_step``). ``--step-graph`` (an experiment): every configuration's forward
and backward replayed from one CUDA graph (``CapturedStep``), which takes the host out of the
step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoConfig

from benchmarks.random_models import random_model, tiny_config
from lrsa_serve.config import LagKVConfig
from lrsa_serve.training import loop
from lrsa_serve.training import model as model_mod
from lrsa_serve.training.attention import sequence_select
from lrsa_serve.training.attention.op import PHASES
from lrsa_serve.training.attention.varlen import packing_for
from lrsa_serve.training.config import LRSA_KERNELS, ModelConfig, OptimConfig
from lrsa_serve.training.data import IGNORE_INDEX, TokenizedExample, collate

FLOOR = "lrsa_bench_floor"
EAGER_CALLS = "lrsa_eager_calls"  # the --eager-calls run
TRITON_ALL = "lrsa_triton_all"  # the --triton-all-lengths run
TRITON_FROM = sequence_select.TRITON_MIN_LENGTH
QWEN2_HALF_BILLION = Path(__file__).parent / "configs" / "qwen2-0.5b-class"


def no_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """The floor: attention costs nothing, the rest of the layer runs (queries pass through)."""
    return query.transpose(1, 2), None


AttentionInterface.register(FLOOR, no_attention)


def train_step(model, optimizer, batch, autocast) -> None:
    """The trainer's step: loss, backward, clip, optimizer; nothing read back from the device
    (the batch's target count is known before the step, as the trainer knows it)."""
    (loop.loss_sum(model, batch, autocast) / batch["targets"]).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class CapturedStep:
    """``train_step`` with its loss and backward captured once as one CUDA graph and replayed
    (``--step-graph``): one launch for the whole forward and backward (checkpoint recompute and
    the LRSA op's calls included) instead of one per kernel; the clip and the optimizer run
    outside it. For a fixed batch, as this benchmark's: a trainer would need one graph per
    length bucket. From the capture on, the parameters' gradients are the graph's tensors,
    which every replay overwrites; ``release`` drops them with the graph."""

    def __init__(self, model, optimizer, batch, autocast, warmup: int) -> None:
        self.model, self.optimizer = model, optimizer
        device = batch["input_ids"].device
        # Eager steps first, off the default stream as capture wants: they compile the layers
        # and run the op's calls (their first uses compile and fill caches, which a capture
        # cannot do); they end with the gradients set to None, so the capture allocates them.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 2)):
                train_step(model, optimizer, batch, autocast)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = loop.loss_sum(model, batch, autocast) / batch["targets"]
            self.loss.backward()

    def __call__(self) -> None:
        self.graph.replay()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()

    def release(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        del self.graph, self.loss
        torch.cuda.empty_cache()


def make_step(model, optimizer, batch, autocast, warmup: int, captured: bool) -> Callable[[], None]:
    if captured:
        return CapturedStep(model, optimizer, batch, autocast, warmup)
    return lambda: train_step(model, optimizer, batch, autocast)


def timed_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds of one optimizer step."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


LRSA_OPS = ("lrsa::varlen", "lrsa::varlen_backward", *PHASES)
PROFILE_ROWS = 8


def profiled_step(step: Callable[[], None], device: torch.device) -> dict:
    """One step under the torch profiler (after the timed ones: compiled, warm). A step is
    host-bound when its GPU kernels add up to much less than its wall time. Per step: the wall
    time (the profiler's own host overhead included), the kernels' summed GPU time, the kernel
    launches, and for each LRSA op and each of its phases (``op.PHASES``: selection, the
    items' index, packing, the kernel, unpacking the gradients, a replayed graph) its calls, host
    time (the whole call, kernels launched inside included) and GPU time (of the kernels it
    launched, a replayed graph's included); the host's costliest ops by their own time, and the
    GPU's costliest kernels.

    A profiler range (``record_function``) also shows on the GPU's timeline, as a span from its
    first kernel to its last: counted with the kernels it would count them twice, and the gaps
    between them too. So only the CPU side of a range is read, and kernels are the GPU's
    activities that are not such spans."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        sync(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    ops = {e.key: e for e in events if e.key in LRSA_OPS and e.device_type == DeviceType.CPU}
    host = sorted(events, key=lambda e: -e.self_cpu_time_total)[:PROFILE_ROWS]
    # Device activities only (an op's own device time counts its kernels a second time), and
    # not the ranges' spans on the GPU.
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:PROFILE_ROWS]
    return {
        "wall_ms": wall * 1e3,
        "gpu_kernels_ms": sum(e.self_device_time_total for e in kernels) / 1e3,
        "kernel_launches": sum(e.count for e in events if "LaunchKernel" in e.key),
        "ops": {
            name: {
                "calls": ops[name].count,
                "host_ms": ops[name].cpu_time_total / 1e3,
                "gpu_ms": ops[name].device_time_total / 1e3,
            }
            for name in LRSA_OPS
            if name in ops
        },
        "top_host": [{"op": e.key[:60], "self_ms": e.self_cpu_time_total / 1e3} for e in host],
        "top_kernels": [
            {"kernel": e.key[:60], "ms": e.self_device_time_total / 1e3, "count": e.count}
            for e in top
        ],
    }


def print_profile(name: str, n: int, checkpointing: str, prof: dict) -> None:
    share = prof["gpu_kernels_ms"] / prof["wall_ms"]
    print(
        f"  profile {name} n={n} ckpt={checkpointing}: wall {prof['wall_ms']:.1f} ms, GPU kernels "
        f"{prof['gpu_kernels_ms']:.1f} ms ({100 * share:.0f}%), {prof['kernel_launches']} launches"
    )
    for op, o in prof["ops"].items():
        print(f"    {op}: {o['calls']} calls, host {o['host_ms']:.2f} ms, GPU {o['gpu_ms']:.2f} ms")
    for row in prof["top_host"]:
        print(f"    host {row['self_ms']:8.2f} ms  {row['op']}")
    for row in prof["top_kernels"]:
        print(f"    GPU  {row['ms']:8.2f} ms  {row['count']:5d}x {row['kernel']}")


def qa_batch(n: int, vocab_size: int, target_tokens: int, device: torch.device) -> dict:
    """One random sequence of ``n`` tokens whose loss is on its last ``target_tokens`` (QA),
    collated as the trainer collates, and its target count (``targets``: counted before any
    step, as the trainer knows it)."""
    ids = torch.randint(0, vocab_size, (n,)).tolist()
    labels = [IGNORE_INDEX] * (n - target_tokens) + ids[n - target_tokens :]
    example = TokenizedExample(ids, labels, "benchmark")
    batch = {k: v.to(device) for k, v in collate([example], pad_id=0).items()}
    return batch | {"targets": example.num_targets}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def selection_ms(
    n: int, kv_heads: int, head_dim: int, cfg: LagKVConfig, device: torch.device
) -> float:
    k = torch.randn(1, kv_heads, n, head_dim, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    rule = cfg.rule
    for _ in range(3):
        sequence_select.select_kept(k, v, rule)
    sync(device)
    start = time.perf_counter()
    for _ in range(20):
        sequence_select.select_kept(k, v, rule)
    sync(device)
    return (time.perf_counter() - start) / 20 * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--sink", type=int, default=16)
    parser.add_argument("--lag", type=int, default=1024)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--target-tokens", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpointing", nargs="+", default=["on", "off"])
    parser.add_argument(
        "--lrsa-variants",
        nargs="+",
        default=["auto"],
        choices=LRSA_KERNELS,
        help="LRSA kernels to time (the trainer's --lrsa-kernel); the first is 'lrsa' in the JSON",
    )
    parser.add_argument(
        "--floor", action="store_true", help="also time the model with attention removed"
    )
    parser.add_argument(
        "--eager-calls",
        action="store_true",
        help="also time the first LRSA variant with the op's calls run eagerly instead of "
        "replayed from CUDA graphs (what the graphs gain, in the same run)",
    )
    parser.add_argument(
        "--triton-all-lengths",
        action="store_true",
        help="also time the first LRSA variant with the Triton selection and packing at every "
        f"length (default: from {sequence_select.TRITON_MIN_LENGTH} tokens)",
    )
    parser.add_argument(
        "--step-graph",
        action="store_true",
        help="every configuration's forward and backward captured as one CUDA graph and "
        "replayed (CapturedStep); an experiment, CUDA only",
    )
    parser.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="torch.compile the decoder layers (auto: as the trainer, i.e. on CUDA)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="one more step of each under the torch profiler"
    )
    parser.add_argument("--deadline", type=float, default=200.0, help="seconds; skip the rest")
    parser.add_argument("--out", default="train_model.json")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script")
    args = parser.parse_args()
    started = time.time()
    cfg = LagKVConfig(sink=args.sink, lag=args.lag, ratio=args.ratio)
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.step_graph and device.type != "cuda":
        parser.error("--step-graph needs a CUDA device")
    if args.smoke:
        config = tiny_config("qwen2", vocab_size=300)
    else:
        config = AutoConfig.from_pretrained(QWEN2_HALF_BILLION)
    with device:
        model = random_model(config)
    params = sum(p.numel() for p in model.parameters())
    choice = {"auto": None, "on": True, "off": False}[args.compile]
    compiled = ModelConfig(compile=choice).compiles_on(device.type)
    if compiled:
        model_mod.compile_layers(model)
    optimizer = loop.build_optimizer(model, OptimConfig(lr=1e-5), device)  # fused on CUDA
    autocast = loop.autocast_for(device, "bf16")
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "params": params,
        "settings": cfg.model_dump()
        | {
            "target_tokens": args.target_tokens,
            "compiled_layers": compiled,
            "step_graph": args.step_graph,
        },
        "lrsa_variants": args.lrsa_variants,
        "rows": [],
    }
    # (name in the JSON, LRSA variant or None for dense): the first variant is plain "lrsa"
    runs = [("dense", None), ("lrsa", args.lrsa_variants[0])]
    runs += [(f"lrsa_{v}", v) for v in args.lrsa_variants[1:]]
    if args.eager_calls:
        runs.append((EAGER_CALLS, args.lrsa_variants[0]))
    if args.triton_all_lengths:
        runs.append((TRITON_ALL, args.lrsa_variants[0]))
    others = [name for name, _ in runs[2:]]  # the LRSA variants after the first
    if args.floor:
        runs.append(("floor", FLOOR))
    for checkpointing in args.checkpointing:
        for n in args.lengths:
            batch = qa_batch(n, config.vocab_size, args.target_tokens, device)
            row = {"n": n, "checkpointing": checkpointing}
            for attention, variant in runs:
                if time.time() - started > args.deadline:
                    row[f"{attention}_s"] = None
                    continue
                if variant == FLOOR:
                    model.set_attn_implementation(FLOOR)
                elif variant is None:
                    model_mod.set_attention(model, "dense", cfg)
                else:
                    graphed = attention != EAGER_CALLS
                    model_mod.set_attention(model, "lrsa", cfg, variant, cuda_graphs=graphed)
                sequence_select.TRITON_MIN_LENGTH = 0 if attention == TRITON_ALL else TRITON_FROM
                # the trainer's own set-up (checkpointing per layer, replaying the selection)
                model_mod.prepare_for_training(model, checkpointing == "on")
                if compiled:
                    # Each configuration compiles afresh. Without this the layers' compiled code,
                    # shared by all configurations, made the order matter: at 16K the second
                    # LRSA variant of a run measured up to ~20% slower than the first, whichever
                    # it was (docs/training.md).
                    torch.compiler.reset()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                step = None
                try:
                    step = make_step(
                        model, optimizer, batch, autocast, args.warmup, args.step_graph
                    )
                    seconds = timed_steps(step, device, args.warmup, args.steps)
                except torch.OutOfMemoryError:
                    row[f"{attention}_s"] = "OOM"
                    if isinstance(step, CapturedStep):
                        step.release()
                    optimizer.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    continue
                row[f"{attention}_s"] = seconds
                row[f"{attention}_tokens_per_s"] = n / seconds
                if device.type == "cuda":
                    row[f"{attention}_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
                if args.profile:
                    prof = profiled_step(step, device)
                    row[f"{attention}_profile"] = prof
                    print_profile(attention, n, checkpointing, prof)
                if isinstance(step, CapturedStep):
                    step.release()
            # the defaults again, for selection_ms below and the next row's first runs
            sequence_select.TRITON_MIN_LENGTH = TRITON_FROM
            # the configurations that ran (not skipped by the deadline, not out of memory)
            done = {a: row[f"{a}_s"] for a, _ in runs if isinstance(row[f"{a}_s"], float)}
            for attention in others:  # the other variants' speedups
                if "dense" in done and attention in done:
                    row[f"{attention}_speedup"] = done["dense"] / done[attention]
            if "dense" in done and "lrsa" in done:
                row["speedup"] = done["dense"] / done["lrsa"]
                head_dim = config.hidden_size // config.num_attention_heads
                per_layer = selection_ms(n, config.num_key_value_heads, head_dim, cfg, device)
                select_s = per_layer * config.num_hidden_layers / 1e3
                row["selection_ms_per_layer"] = per_layer
                row["selection_share_of_lrsa_step"] = select_s / done["lrsa"]
            if "dense" in done and "floor" in done:
                attention_s = done["dense"] - done["floor"]
                pairs = packing_for(n, cfg.rule).visible_pairs()  # the mask lets through
                row["pair_ratio"] = ratio = n * (n + 1) / 2 / pairs
                row["dense_attention_s"] = attention_s
                row["best_speedup"] = done["dense"] / (done["floor"] + attention_s / ratio)
            result["rows"].append(row)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
            print(json.dumps(row), flush=True)
    print(
        f"\n{result['device']}, torch {result['torch']}, random Qwen2 {params / 1e6:.0f}M params, "
        f"bf16 autocast, batch 1, loss on last {args.target_tokens} tokens, {cfg.short()}"
    )
    extra = "".join(f" {name + ' tok/s':>18} {'speedup':>8}" for name in others)
    print(
        f"lrsa = kernel {args.lrsa_variants[0]}\n"
        f"{'n':>6} {'ckpt':>4} {'dense tok/s':>12} {'lrsa tok/s':>11} {'speedup':>8} {'select':>7}"
        f"{extra}" + (f" {'floor tok/s':>12} {'best':>6}" if args.floor else "")
    )
    for r in result["rows"]:
        if "speedup" not in r:
            print(f"{r['n']:>6} {r['checkpointing']:>4}  incomplete: {r}")
            continue
        cells = "".join(
            f" {r[name + '_tokens_per_s']:>18.0f} {r[name + '_speedup']:>7.2f}x"
            if name + "_speedup" in r
            else f" {'-':>18} {'-':>8}"
            for name in others
        )
        print(
            f"{r['n']:>6} {r['checkpointing']:>4} {r['dense_tokens_per_s']:>12.0f} "
            f"{r['lrsa_tokens_per_s']:>11.0f} {r['speedup']:>7.2f}x "
            f"{100 * r['selection_share_of_lrsa_step']:>6.1f}%{cells}"
            + (
                f" {r['floor_tokens_per_s']:>12.0f} {r['best_speedup']:>5.2f}x"
                if "best_speedup" in r
                else ""
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
