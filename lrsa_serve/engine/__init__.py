"""vLLM integration: LagKV eviction through vLLM's plugin interfaces (no vLLM source edited)."""

from lrsa_serve.engine.api import engine_args, lagkv_engine_kwargs, make_llm, resolve_settings

__all__ = ["engine_args", "lagkv_engine_kwargs", "make_llm", "resolve_settings"]
