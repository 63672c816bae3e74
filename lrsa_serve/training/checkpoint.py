"""Resumable checkpoints (torch.distributed.checkpoint) and the final HF export.

Layout under ``out_dir``::

    checkpoints/step_000050/   model + optimizer shards (DCP) and trainer.json (step, scheduler,
                               data fingerprint, job config); written to ``*.partial`` first and
                               renamed when complete, so a run killed mid-save leaves no
                               half checkpoint that a resume could pick
    metrics.jsonl              one JSON object per logged step / eval / event
    config.json, model.safetensors, tokenizer files
                               the exported HF checkpoint (``export_hf``), with "lagkv" settings

The same code saves one process's plain model and N processes' FSDP2 shards: DCP and
``get_state_dict`` handle both.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lrsa_serve.config import LagKVConfig

STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer.json"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _step_dirs(root: Path) -> list[Path]:
    """The ``step_N`` folders under ``root``, oldest step first."""
    if not root.is_dir():
        return []
    steps = [(int(m.group(1)), path) for path in root.iterdir() if (m := STEP_DIR.match(path.name))]
    return [path for _, path in sorted(steps)]


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint (one with its trainer.json), or None."""
    done = [p for p in _step_dirs(out_dir / "checkpoints") if (p / TRAINER_STATE).is_file()]
    return done[-1] if done else None


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int,
    rank: int,
) -> None:
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = out_dir / "checkpoints" / f"step_{step:06d}"
    partial = final.with_name(final.name + ".partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        save({"model": model_state, "optim": optim_state}, checkpoint_id=str(partial))
    _barrier()
    if rank == 0:
        (partial / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        older = [path for path in _step_dirs(final.parent) if path != final]
        for path in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(path, ignore_errors=True)
    _barrier()


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore model and optimizer in place; returns the trainer state saved with them."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        load(state, checkpoint_id=str(path))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    return json.loads((path / TRAINER_STATE).read_text())


def export_hf(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: Path,
    lagkv: LagKVConfig | None,
    dtype: torch.dtype,
    rank: int,
) -> None:
    """Write an HF checkpoint (safetensors, tokenizer, config.json with "lagkv") into out_dir.

    All ranks take part in gathering the full state dict; rank 0 writes. The result loads with
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` and is served by vLLM unchanged; with
    ``lagkv`` set, ``lrsa serve out_dir`` compresses with the settings it was trained with.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    distributed = dist.is_available() and dist.is_initialized()
    options = StateDictOptions(full_state_dict=True, cpu_offload=distributed)
    state = get_model_state_dict(model, options=options)
    if rank != 0:
        _barrier()
        return
    state = {name: tensor.detach().to("cpu", dtype) for name, tensor in state.items()}
    if getattr(model.config, "tie_word_embeddings", False):
        # FSDP's full state dict names a tied weight twice; the checkpoint stores it once, as
        # an unsharded save_pretrained does.
        for name in getattr(model, "_tied_weights_keys", None) or ():
            state.pop(name, None)
    partial = out_dir / ".export.partial"
    shutil.rmtree(partial, ignore_errors=True)
    config = model.config
    use_cache, saved_dtype = config.use_cache, getattr(config, "dtype", None)
    config.use_cache = True  # training turned it off; serving and generation want it
    config.dtype = dtype
    try:
        model.save_pretrained(partial, state_dict=state, safe_serialization=True)
    finally:
        config.use_cache, config.dtype = use_cache, saved_dtype
    tokenizer.save_pretrained(partial)
    written = json.loads((partial / "config.json").read_text())
    # The training-time attention is not the checkpoint's business: loaders pick their own.
    for key in ("_attn_implementation", "attn_implementation", "_attn_implementation_internal"):
        written.pop(key, None)
    written.pop("lagkv", None)
    (partial / "config.json").write_text(json.dumps(written, indent=2) + "\n")
    if lagkv is not None:
        lagkv.write_to_checkpoint(partial)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.safetensors*"):
        stale.unlink()
    for item in partial.iterdir():
        item.replace(out_dir / item.name)
    partial.rmdir()
    _barrier()
