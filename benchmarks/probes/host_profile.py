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
from common import CFG, compiled_half_billion, profiled_steps

from lrsa_serve.training import loop
from lrsa_serve.training import model as model_mod

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_model import qa_batch  # noqa: E402

DEVICE = torch.device("cuda")


def main(n: int) -> None:
    model, optimizer, autocast = compiled_half_billion(DEVICE)
    model_mod.prepare_for_training(model, True)
    batch = qa_batch(n, model.config.vocab_size, 512, DEVICE)
    for attention in ["dense", "lrsa"]:
        model_mod.set_attention(model, attention, CFG)
        seconds, table = profiled_steps(model, optimizer, batch, autocast, "cpu_time_total", 40, 70)
        # host time of the step alone: the same step without waiting for the GPU at the end
        start = time.perf_counter()
        total, count = loop.loss_sum(model, batch, autocast)
        (total / count).backward()
        host_s = time.perf_counter() - start
        torch.cuda.synchronize()
        optimizer.zero_grad(set_to_none=True)
        print(f"{attention} n={n}: {seconds * 1e3:.1f} ms/step, fwd+bwd issued in "
              f"{host_s * 1e3:.1f} ms of host time", flush=True)  # fmt: skip
        print(f"---- {attention}\n{table}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16384)
