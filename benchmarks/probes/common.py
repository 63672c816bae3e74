"""What the GPU probes share: the 0.5B model's 32K LRSA layer (S=16, L=1024, r=0.25) and a timer.

Each probe runs as a script, so this directory is on ``sys.path`` and they import it as
``common``; importing it also puts the repository root on the path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: train_model

from train_model import timed_steps  # noqa: E402

from lrsa_serve.config import LagKVConfig  # noqa: E402
from lrsa_serve.training import loop  # noqa: E402
from lrsa_serve.training import model as model_mod  # noqa: E402
from lrsa_serve.training.attention import dispatch  # noqa: E402
from lrsa_serve.training.attention import varlen as lv  # noqa: E402
from lrsa_serve.training.config import OptimConfig  # noqa: E402
from lrsa_serve.training.tiny import qwen2_half_billion_config, random_model  # noqa: E402

N = 32768
CFG = LagKVConfig(sink=16, lag=1024, ratio=0.25)
RULE = dispatch.Rule.of(CFG)


def cuda_ms(fn, reps: int = 20) -> float:
    """Mean milliseconds per call over ``reps`` back-to-back calls (CUDA events), after 3."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def packed_layer(key: torch.Tensor, value: torch.Tensor):
    """One layer's selection and varlen packing: ``kept``, the ``Packing``, ``cu_q``/``cu_k``,
    the template on the device and the key index ``[1, Tk, Hkv]``."""
    kept = dispatch.select_kept(key, value, RULE)
    packing = lv.Packing.of(key.shape[2], RULE)
    cu_q, cu_k, template = lv._tensors(packing, 1, str(key.device))
    return kept, packing, cu_q, cu_k, template, lv.key_index(kept, packing, template)


def compiled_half_billion(device: torch.device):
    """The benchmarks' random 0.5B Qwen2 on ``device`` as the trainer runs it (compiled layers,
    fused AdamW, bf16 autocast): ``(model, optimizer, autocast)``."""
    with device:
        model = random_model(qwen2_half_billion_config())
    model_mod.compile_layers(model)
    optimizer = loop.build_optimizer(model, OptimConfig(lr=1e-5), device)
    return model, optimizer, loop.autocast_for(device, "bf16")


def profiled_steps(model, optimizer, batch, autocast, sort_by: str, rows: int, width: int):
    """Median seconds of a training step (2 warm-up, 3 timed) and the profiler table of one
    more step, sorted by ``sort_by``."""
    seconds = timed_steps(model, optimizer, batch, autocast, 2, 3)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timed_steps(model, optimizer, batch, autocast, 0, 1)
    table = prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=width)
    return seconds, table
