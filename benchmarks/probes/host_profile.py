"""Where the host time of a 16K training step goes (the 0.5B model, compiled layers, fused AdamW,
checkpointing on): at 16K the LRSA step is partly CPU-bound, so the profile is sorted by CPU time.

Needs CUDA (flash-attn-4 optional). Runs on the GPU machine from the repo root:

    python3 benchmarks/probes/host_profile.py [LENGTH]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from common import CFG
from torch.profiler import ProfilerActivity, profile

from lrsa_serve.kernels import lrsa_attention as la
from lrsa_serve.training import loop
from lrsa_serve.training import model as model_mod
from lrsa_serve.training.config import OptimConfig
from lrsa_serve.training.data import IGNORE_INDEX
from lrsa_serve.training.tiny import qwen2_half_billion_config, random_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_model import timed_steps  # noqa: E402

DEVICE = torch.device("cuda")


def main(n: int) -> None:
    config = qwen2_half_billion_config()
    with DEVICE:
        model = random_model(config)
    model_mod.compile_layers(model)
    optimizer = loop.build_optimizer(model, OptimConfig(lr=1e-5), DEVICE)
    autocast = loop.autocast_for(DEVICE, "bf16")
    model_mod.prepare_for_training(model, True)
    ids = torch.randint(0, config.vocab_size, (1, n), device=DEVICE)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -512:] = ids[:, -512:]
    batch = {"input_ids": ids, "labels": labels}
    la.set_backend("varlen")
    for attention in ["dense", "lrsa"]:
        model_mod.set_attention(model, attention, CFG)
        seconds = timed_steps(model, optimizer, batch, autocast, 2, 3)
        # host time of the step alone: the same step without waiting for the GPU at the end
        start = time.perf_counter()
        total, count = loop.loss_sum(model, batch, autocast)
        (total / count).backward()
        host_s = time.perf_counter() - start
        torch.cuda.synchronize()
        optimizer.zero_grad(set_to_none=True)
        print(f"{attention} n={n}: {seconds * 1e3:.1f} ms/step, fwd+bwd issued in "
              f"{host_s * 1e3:.1f} ms of host time", flush=True)  # fmt: skip
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            timed_steps(model, optimizer, batch, autocast, 0, 1)
        print(f"---- {attention}")
        table = prof.key_averages().table(
            sort_by="cpu_time_total", row_limit=40, max_name_column_width=70
        )
        print(table)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16384)
