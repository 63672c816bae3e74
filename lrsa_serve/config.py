"""LagKV settings: one validated object shared by the reference, the engine and the trainer.

A checkpoint carries its settings under ``"lagkv"`` in ``config.json``; explicit overrides
(Python API, CLI flags) win over it. See ``docs/lagkv.md`` for what each field means.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if TYPE_CHECKING:
    import argparse

    from lrsa_serve.lagkv import Rule

CONFIG_KEY = "lagkv"


def keep_for(lag: int, ratio: float) -> int:
    """Tokens kept per partition and KV head: int(r * L) (also read where dynamo traces)."""
    return int(ratio * lag)


class LagKVConfigError(ValueError):
    """Settings that cannot work; the message is one line meant for the user."""


class LagKVConfig(BaseModel):
    """Sink S, lag L, kept ratio r, value-score weight.

    Defaults were picked by passkey retrieval of the default model under the reference
    attention (docs/benchmarks.md, "Choosing the LagKV defaults"): L=256 keeps the lag window
    long enough for 4x compression to still find the key, and S=32 is one CPU KV block.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    sink: int = Field(32, ge=0, description="sink S: first tokens, never evicted")
    lag: int = Field(256, ge=1, description="lag L: partition (lag window) size in tokens")
    ratio: float = Field(
        0.25, gt=0.0, le=1.0, description="ratio r: fraction of each partition kept, in (0, 1]"
    )
    score_v_ratio: float = Field(1.0, ge=0.0, description="value-score weight")

    @model_validator(mode="after")
    def _keep_at_least_one(self) -> LagKVConfig:
        if self.keep < 1:
            raise ValueError(
                f"ratio={self.ratio} keeps int({self.ratio}*{self.lag}) = 0 tokens per partition; "
                "raise ratio or lag"
            )
        return self

    @property
    def keep(self) -> int:
        """Tokens kept per partition and KV head: int(r * L)."""
        return keep_for(self.lag, self.ratio)

    @property
    def rule(self) -> Rule:
        """The numbers every LagKV function reads (``lagkv.Rule``)."""
        from lrsa_serve.lagkv import Rule  # here: lagkv imports torch, `lrsa --help` does not

        return Rule(self.sink, self.lag, self.keep, self.score_v_ratio)

    def check_block_size(self, block_size: int) -> None:
        """Raise LagKVConfigError unless S, L and keep are multiples of the KV block size.

        Whole blocks are then freed per compressed partition, which is what lets vLLM's
        block pool take them back.
        """
        bad = [
            f"{name}={value}"
            for name, value in (("sink", self.sink), ("lag", self.lag), ("keep", self.keep))
            if value % block_size
        ]
        if bad:
            raise LagKVConfigError(
                f"LagKV settings must be multiples of the KV block size {block_size}: "
                f"{', '.join(bad)} are not (keep = int(ratio*lag))"
            )

    def short(self) -> str:
        return (
            f"sink={self.sink} lag={self.lag} ratio={self.ratio} keep={self.keep} "
            f"score_v_ratio={self.score_v_ratio}"
        )

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def build(cls, **fields: Any) -> LagKVConfig:
        """Validate, turning pydantic's multi-line report into one line."""
        try:
            return cls(**{k: v for k, v in fields.items() if v is not None})
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "lagkv"
            msg = first["msg"].removeprefix("Value error, ")
            raise LagKVConfigError(f"invalid LagKV setting {where}: {msg}") from None

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path) -> LagKVConfig | None:
        """The settings a checkpoint carries in config.json, or None when it has none."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            return None
        section = json.loads(path.read_text()).get(CONFIG_KEY)
        return None if section is None else cls.build(**section)

    @classmethod
    def resolve(cls, model_dir: str | Path | None, **overrides: Any) -> LagKVConfig | None:
        """Checkpoint settings with explicit overrides on top; None if neither says anything."""
        base = cls.from_checkpoint(model_dir) if model_dir is not None else None
        given = {k: v for k, v in overrides.items() if v is not None}
        if base is None and not given:
            return None
        merged = (base.model_dump() if base else {}) | given
        return cls.build(**merged)

    @classmethod
    def for_model(cls, model_dir: str | Path, **overrides: Any) -> LagKVConfig:
        """``resolve``, else the defaults: the settings a compressed model runs under."""
        return cls.resolve(model_dir, **overrides) or cls()

    def write_to_checkpoint(self, model_dir: str | Path) -> None:
        path = Path(model_dir) / "config.json"
        data = json.loads(path.read_text())
        data[CONFIG_KEY] = self.model_dump()
        path.write_text(json.dumps(data, indent=2) + "\n")


# ---- command-line flags ---------------------------------------------------------------------
def add_lagkv_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--sink --lag --ratio --score-v-ratio``, one per field, unset (None) unless given."""
    for name, field in LagKVConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=field.annotation, help=f"LagKV {field.description}")


def lagkv_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The LagKV flags of ``args`` by field name (None: not given)."""
    return {name: getattr(args, name) for name in LagKVConfig.model_fields}
