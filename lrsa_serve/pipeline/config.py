"""The pipeline's YAML: one pydantic model per section, unknown keys refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from lrsa_serve.config import LagKVConfig
from lrsa_serve.errors import UserError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# LagKVConfig's fields, each optional: what the config names overrides the base model's own.
LagKVSection = create_model(
    "LagKVSection",
    __base__=_Section,
    **{name: (field.annotation | None, None) for name, field in LagKVConfig.model_fields.items()},
)


class TrainSection(_Section):
    args: dict[str, Any] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"lrsa": {}})


class ServeSection(_Section):
    args: list[str] = Field(default_factory=list)
    ready_timeout: float = Field(900.0, gt=0)


class EvalSection(_Section):
    tasks: list[str] | None = None
    lengths: list[int] = Field(default_factory=lambda: [2048, 4096])
    depths: list[float] = Field(default_factory=lambda: [0.1, 0.5, 0.9])
    samples: int = Field(2, ge=1)
    seed: int = 0
    api: Literal["completions", "chat"] = "chat"
    concurrency: int = Field(4, ge=1)
    timeout: float = Field(600.0, gt=0)
    uncompressed_baseline: bool = False  # also the base model without LagKV


class BaseSection(_Section):
    url: str | None = None
    api_key: str | None = None


class PipelineConfig(_Section):
    name: str = "pipeline"
    out: str
    model: str | None = None
    lagkv: LagKVSection = Field(default_factory=LagKVSection)
    train: TrainSection = Field(default_factory=TrainSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    base: BaseSection = Field(default_factory=BaseSection)


def load_config(path: str | Path) -> PipelineConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise UserError(f"{path}: {where}: {first['msg']}") from None
