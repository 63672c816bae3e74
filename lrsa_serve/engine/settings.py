"""Where the engine's LagKV settings come from, and the checks run once at start-up.

Precedence: ``additional_config["lagkv"]`` (what ``make_llm`` and ``lrsa serve`` pass, built
from CLI/API overrides) on top of the checkpoint's ``config.json`` ``"lagkv"`` section. A model
with neither runs stock vLLM.
"""

from __future__ import annotations

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


def incompatibilities(vllm_config: VllmConfig) -> list[str]:
    """Features that cannot work once KV rows are evicted (they replay, share or move blocks)."""
    problems = []
    if vllm_config.cache_config.enable_prefix_caching:
        problems.append(
            "prefix caching (pass enable_prefix_caching=False / --no-enable-prefix-caching)"
        )
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding")
    if vllm_config.kv_transfer_config is not None:
        problems.append("KV transfer / offload connectors")
    parallel = vllm_config.parallel_config
    if (
        parallel.decode_context_parallel_size > 1
        or getattr(parallel, "prefill_context_parallel_size", 1) > 1
    ):
        problems.append("decode/prefill context parallelism")
    return problems


def check_engine_config(settings: LagKVConfig, vllm_config: VllmConfig) -> None:
    """Raise LagKVConfigError (one line) unless these settings can run in this engine."""
    settings.check_block_size(vllm_config.cache_config.block_size)
    problems = incompatibilities(vllm_config)
    if problems:
        raise LagKVConfigError("LagKV eviction cannot run with " + ", ".join(problems))


def additional_config_for(settings: LagKVConfig | None) -> dict[str, Any]:
    return {} if settings is None else {CONFIG_KEY: settings.model_dump()}
