"""Training job configuration: small nested dataclasses (torchtitan style), one per concern.

``JobConfig`` is what the CLI builds from flags (and an optional YAML file), what the loop reads,
and what a checkpoint records next to its weights (``to_dict``). Every field has a default that
works on the default model; the LagKV numbers live in the project's ``LagKVConfig``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lrsa_serve.config import LagKVConfig
from lrsa_serve.synthetic_tasks import TASKS

ATTENTIONS = ("lrsa", "dense")
# Kernels of the LRSA attention's varlen call (training/attention/varlen.py).
LRSA_KERNELS = ("auto", "fa4", "flash", "efficient", "math")
OVERLONG_POLICIES = ("skip", "truncate")
MIXED_PRECISION = ("bf16", "fp32")
EXPORT_DTYPES = ("float32", "bfloat16")
# Synthetic lengths when not given: 2,048-8,000 tokens, capped so every example fits max_len
# (the shortest at most half of it, so short runs still get a spread of lengths).
SYNTHETIC_MIN_TOKENS = 2048
SYNTHETIC_MAX_TOKENS = 8000


@dataclass
class ModelConfig:
    path: str | None = None  # local HF folder; None = the project's default model
    attention: str = "lrsa"  # "lrsa" (the LagKV mask) or "dense" (vanilla SDPA, for comparison)
    lrsa_kernel: str = "auto"  # the LRSA attention's kernel (dispatch.set_kernel, --lrsa-kernel)
    # The LRSA op's calls captured once per shape as CUDA graphs and replayed per layer
    # (training/attention/graphs.py; FlashAttention-2 calls). Off: every call eager.
    cuda_graphs: bool = True
    gradient_checkpointing: bool = True
    # torch.compile the decoder layers (model.compile_layers); None = on CUDA only. Measured on
    # the H100 (docs/training.md): +32% LRSA / +22% dense tokens/s on a 0.5B model at 32K.
    compile: bool | None = None

    def compiles_on(self, device_type: str) -> bool:
        return device_type == "cuda" if self.compile is None else self.compile


@dataclass
class DataConfig:
    source: str = "synthetic"  # a JSONL file or "synthetic"
    eval_source: str | None = None  # JSONL of held-out examples (synthetic: its eval split)
    max_len: int = 8192
    overlong: str = "skip"  # examples over max_len: "skip" them or "truncate" (keep the start)
    batch_size: int = 1  # sequences per micro-batch and rank
    pad_multiple: int = 64  # batches are right-padded to a multiple of this
    # --data synthetic: RULER-style QA from lrsa_serve.synthetic_tasks, seeds disjoint from the
    # eval split. None = derived for the run by JobConfig.fill_derived.
    synthetic_examples: int | None = None
    synthetic_eval_examples: int = 64
    synthetic_min_tokens: int | None = None  # shortest prompt asked for
    synthetic_max_tokens: int | None = None  # longest example (prompt, template and answer)
    synthetic_tasks: tuple[str, ...] = tuple(TASKS)  # all of them


@dataclass
class OptimConfig:
    lr: float = 2e-5
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    out_dir: str = "out/lrsa-train"
    steps: int = 100
    grad_accum: int = 1
    seed: int = 0
    mixed_precision: str = "bf16"  # autocast dtype on CUDA; CPU runs in float32
    log_every: int = 1
    eval_every: int = 50  # 0 = only at the end
    save_every: int = 50  # 0 = only at the end
    keep_checkpoints: int = 2
    resume: bool = False
    export_dtype: str = "float32"  # float32 keeps the trained weights exactly
    progress: bool = True  # tqdm bar on rank 0


# JobConfig's sections besides lagkv (LagKVConfig), by name: the YAML file's and to_dict's keys.
SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lagkv: LagKVConfig = field(default_factory=LagKVConfig)

    def fill_derived(self) -> JobConfig:
        """Give the synthetic settings left at None their values for this run, in place, so the
        job a checkpoint records holds the numbers used (GPUs: torchrun's WORLD_SIZE)."""
        d = self.data
        if d.synthetic_examples is None:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            # Each optimizer step takes grad_accum x world_size micro-batches of batch_size;
            # more examples would never be seen, fewer would repeat within the run.
            d.synthetic_examples = (
                self.train.steps * self.train.grad_accum * world_size * d.batch_size
            )
        if d.synthetic_max_tokens is None:
            d.synthetic_max_tokens = min(SYNTHETIC_MAX_TOKENS, d.max_len)
        if d.synthetic_min_tokens is None:
            d.synthetic_min_tokens = min(SYNTHETIC_MIN_TOKENS, d.synthetic_max_tokens // 2)
        return self

    def validate(self) -> JobConfig:
        """Fill the derived settings (``fill_derived``), then raise ValueError with one line for
        settings that cannot work."""
        self.fill_derived()
        choices = {
            "attention": (self.model.attention, ATTENTIONS),
            "lrsa kernel": (self.model.lrsa_kernel, LRSA_KERNELS),
            "overlong": (self.data.overlong, OVERLONG_POLICIES),
            "dtype": (self.train.mixed_precision, MIXED_PRECISION),
            "export dtype": (self.train.export_dtype, EXPORT_DTYPES),
        }
        checks = [
            (value in allowed, f"{what} must be one of {allowed}")
            for what, (value, allowed) in choices.items()
        ]
        checks += [
            (self.data.max_len >= 2, "max-len must be at least 2"),
            (self.data.batch_size >= 1, "batch-size must be at least 1"),
            (self.train.grad_accum >= 1, "grad-accum must be at least 1"),
            (self.train.steps >= 1, "steps must be at least 1"),
            (self.optim.lr > 0, "lr must be positive"),
            (self.data.synthetic_examples >= 1, "synthetic examples must be at least 1"),
            (
                0 < self.data.synthetic_min_tokens <= self.data.synthetic_max_tokens,
                "synthetic token range must satisfy 0 < min <= max",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        sections = {name: asdict(getattr(self, name)) for name in SECTIONS}
        return sections | {"lagkv": self.lagkv.model_dump()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobConfig:
        """From a (possibly partial) nested dict, e.g. a YAML file; unknown keys are errors."""
        if unknown := set(data) - set(SECTIONS) - {"lagkv"}:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        built: dict[str, Any] = {}
        for name, kind in SECTIONS.items():
            given = dict(data.get(name) or {})
            known = {f.name for f in fields(kind)}
            if extra := set(given) - known:
                raise ValueError(f"unknown keys in {name}: {sorted(extra)}")
            for key in ("synthetic_tasks", "betas"):
                if key in given:
                    given[key] = tuple(given[key])
            built[name] = kind(**given)
        built["lagkv"] = LagKVConfig.build(**(data.get("lagkv") or {}))
        return cls(**built)

    @classmethod
    def from_yaml(cls, path: str | Path) -> JobConfig:
        import yaml

        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})
