"""What the graph break around LRSA attention costs by itself: the 0.5B model's training step
with attention removed (each layer passes its queries through, as ``train_model.py --floor``),
once traced into the compiled layer and once behind ``torch.compiler.disable`` as the LRSA
attention function is (the layer then runs as several compiled frames around an eager call).

Needs CUDA. Runs on the GPU machine from the repo root:

    python3 benchmarks/probes/graph_break_probe.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from common import compiled_half_billion
from transformers import AttentionInterface

from lrsa_serve.training import model as model_mod

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_model import no_attention, qa_batch, timed_steps  # noqa: E402

AttentionInterface.register("probe_traced", no_attention)
AttentionInterface.register("probe_break", torch.compiler.disable(no_attention))
DEVICE = torch.device("cuda")


def main() -> None:
    model, optimizer, autocast = compiled_half_billion(DEVICE)
    print(f"{'n':>6} {'ckpt':>4} {'traced ms':>10} {'break ms':>9} {'cost ms':>8}")
    for checkpointing in (True, False):
        model_mod.prepare_for_training(model, checkpointing)
        for n in (8192, 16384, 32768):
            batch = qa_batch(n, model.config.vocab_size, 512, DEVICE)
            ms = {}
            for name in ("probe_traced", "probe_break"):
                torch.compiler.reset()  # each compiles afresh, as in train_model.py
                model.set_attn_implementation(name)
                ms[name] = 1e3 * timed_steps(model, optimizer, batch, autocast, 2, 7)
            traced, broken = ms["probe_traced"], ms["probe_break"]
            print(f"{n:>6} {'on' if checkpointing else 'off':>4} {traced:>10.1f} {broken:>9.1f} "
                  f"{broken - traced:>8.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
