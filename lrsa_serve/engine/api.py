"""The engine's Python API: vLLM engine arguments with LagKV wired in.

from lrsa_serve.engine import make_llm
llm = make_llm("path/to/model", ratio=0.25)        # a vllm.LLM
args = engine_args("path/to/model", lag=512)        # AsyncEngineArgs for AsyncLLM / the server
"""

from __future__ import annotations

import logging
import os
from typing import Any

from lrsa_serve.config import LagKVConfig
from lrsa_serve.engine.plugin import register
from lrsa_serve.engine.settings import SCHEDULER, additional_config_for, check_engine_arguments

logger = logging.getLogger("lrsa_serve.engine")


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def default_dtype() -> tuple[str, str]:
    """The dtype for ``dtype="auto"`` and why. On CPUs vLLM 0.32's compiled bfloat16 path
    answered garbage on the default model both on an AVX2-only and on an AVX512-BF16 x86 CPU
    (eager bf16 and float32 were right), and float32 is faster on the first: so float32."""
    if on_cpu():
        return "float32", "CPU: vLLM's compiled bfloat16 path gives wrong tokens; --dtype overrides"
    return "auto", "vLLM's choice from the model's config"


def default_block_size() -> int:
    # CPU attention needs multiples of 32, vLLM's Triton attention uses 16.
    return 32 if on_cpu() else 16


def resolve_settings(
    model: str, lagkv: LagKVConfig | dict | None = None, **overrides: Any
) -> LagKVConfig | None:
    """Checkpoint settings, then ``lagkv`` (object or dict), then single-field overrides."""
    given = lagkv.model_dump() if isinstance(lagkv, LagKVConfig) else dict(lagkv or {})
    given |= {k: v for k, v in overrides.items() if v is not None}
    return LagKVConfig.resolve(model, **given)


def lagkv_engine_kwargs(model: str, settings: LagKVConfig | None, **kwargs: Any) -> dict[str, Any]:
    """Engine keyword arguments for ``model`` under ``settings`` (None: stock vLLM), validated
    once here so a bad combination fails before any engine process starts, in one line."""
    register()  # in case lrsa-serve's entry point is not installed in this environment
    kwargs = {"model": model, **kwargs}
    kwargs.setdefault("block_size", default_block_size())
    if settings is None:
        return kwargs
    settings.check_block_size(kwargs["block_size"])
    check_engine_arguments(kwargs)
    kwargs["scheduler_cls"] = SCHEDULER
    kwargs["additional_config"] = {
        **(kwargs.get("additional_config") or {}),
        **additional_config_for(settings),
    }
    if not on_cpu() and not kwargs.get("attention_backend"):
        from lrsa_serve.engine.cuda_backend import choose_backend

        kwargs["attention_backend"], why = choose_backend(kwargs.get("dtype", "auto"))
        logger.info("LagKV attention: %s (%s)", kwargs["attention_backend"], why)
    logger.info("LagKV: %s (block size %d)", settings.short(), kwargs["block_size"])
    return kwargs


def make_llm(
    model: str | None = None,
    lagkv: LagKVConfig | dict | None = None,
    *,
    sink: int | None = None,
    lag: int | None = None,
    ratio: float | None = None,
    **engine_kwargs: Any,
):
    """A ``vllm.LLM`` serving ``model`` (default: the prepared default model) with LagKV."""
    from vllm import LLM

    from lrsa_serve.models import resolve_model

    model = resolve_model(model)
    settings = resolve_settings(model, lagkv, sink=sink, lag=lag, ratio=ratio)
    if engine_kwargs.get("dtype", "auto") == "auto":
        engine_kwargs["dtype"] = default_dtype()[0]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    tp, pp = (engine_kwargs.get(f"{k}_parallel_size", 1) for k in ("tensor", "pipeline"))
    bound = bind_cpu_workers(tp, pp, bool(engine_kwargs.get("enforce_eager")))
    try:
        if bound:
            logger.info(bound)
        return LLM(**lagkv_engine_kwargs(model, settings, **engine_kwargs))
    finally:
        if bound:  # the workers have started; the next engine of this process decides anew
            from lrsa_serve.engine.cpu_workers import BIND_VARIABLE

            os.environ.pop(BIND_VARIABLE, None)


def bind_cpu_workers(
    tensor_parallel_size: int, pipeline_parallel_size: int, enforce_eager: bool, nnodes: int = 1
) -> str | None:
    """On a CPU host: refuse what vLLM's CPU runner cannot run, then one core group per local
    worker where vLLM's NUMA binding cannot give each a node of its own (``cpu_workers``). Call
    before the engine starts its workers. Returns the start-up line saying which cores each rank
    got, if it bound them."""
    if not on_cpu():
        return None
    from lrsa_serve.engine.cpu_workers import bind_local_ranks, check_pipeline_stages, describe

    check_pipeline_stages(pipeline_parallel_size, enforce_eager)
    groups = bind_local_ranks(tensor_parallel_size * pipeline_parallel_size // max(nnodes, 1))
    return describe(groups) if groups else None


def engine_args(model: str, settings: LagKVConfig | None, **engine_kwargs: Any):
    """``AsyncEngineArgs`` for the server and the benchmarks."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(**lagkv_engine_kwargs(model, settings, **engine_kwargs))
