"""Where the engine's LagKV settings come from, and the checks run once at start-up.

Precedence: ``additional_config["lagkv"]`` (what ``make_llm`` and ``lrsa serve`` pass, built
from CLI/API overrides) on top of the checkpoint's ``config.json`` ``"lagkv"`` section. A model
with neither runs stock vLLM.
"""

from __future__ import annotations

from functools import reduce
from typing import TYPE_CHECKING, Any

from lrsa_serve.config import CONFIG_KEY, LagKVConfig, LagKVConfigError

if TYPE_CHECKING:
    from vllm.config import VllmConfig

# The scheduler LagKV needs (chunks end on partition boundaries), as vLLM's scheduler_cls.
SCHEDULER = "lrsa_serve.engine.scheduler.make_scheduler"

# Set when this process builds a model's attention layers (under vLLM's current config); read by
# the backend's `customize_spec` classmethod, which vLLM calls later without a config at hand.
_process_settings: LagKVConfig | None = None


def settings_from_vllm_config(vllm_config: VllmConfig) -> LagKVConfig | None:
    checkpoint = getattr(vllm_config.model_config.hf_config, CONFIG_KEY, None)
    extra = vllm_config.additional_config
    override = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    if checkpoint is None and override is None:
        return None
    return LagKVConfig.build(**((checkpoint or {}) | (override or {})))


def remember(settings: LagKVConfig | None) -> None:
    global _process_settings
    _process_settings = settings


def remembered() -> LagKVConfig | None:
    return _process_settings


# Features that replay or move KV blocks behind the compaction, refused in one line: where vLLM's
# config holds each (the engine argument is the last name), and what the user is told. (Prefix
# caching shares blocks through LagKVManager's own lookup: prefix_cache.py.)
# Checked on the arguments before any engine process starts, and on the config as the engine builds.
REFUSED = {
    "speculative_config": "speculative decoding",
    "kv_transfer_config": "KV transfer / offload connectors",
    "parallel_config.decode_context_parallel_size": "decode context parallelism",
    "parallel_config.prefill_context_parallel_size": "prefill context parallelism",
}


def _turns_on(value: Any) -> bool:
    """Whether a setting turns its feature on: true, a config object, or a size above 1."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value > 1
    return bool(value)


def _refuse(problems: list[str]) -> None:
    if problems:
        raise LagKVConfigError("LagKV eviction cannot run with " + ", ".join(problems))


def check_engine_arguments(engine_kwargs: dict[str, Any]) -> None:
    """Raise LagKVConfigError (one line) if these engine arguments ask for a refused feature."""
    arguments = {path: engine_kwargs.get(path.rsplit(".", 1)[-1]) for path in REFUSED}
    _refuse([REFUSED[path] for path, value in arguments.items() if _turns_on(value)])


def check_engine_config(settings: LagKVConfig, vllm_config: VllmConfig) -> None:
    """Raise LagKVConfigError (one line) unless these settings can run in this engine."""
    settings.check_block_size(vllm_config.cache_config.block_size)

    def value(path: str) -> Any:
        return reduce(lambda obj, name: getattr(obj, name, None), path.split("."), vllm_config)

    _refuse([what for path, what in REFUSED.items() if _turns_on(value(path))])


def additional_config_for(settings: LagKVConfig | None) -> dict[str, Any]:
    return {} if settings is None else {CONFIG_KEY: settings.model_dump()}
