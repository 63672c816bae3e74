"""``lrsa pipeline``: train -> export -> serve -> eval -> report in one command (see ``cli``)."""

from lrsa_serve.pipeline.cli import (
    ManagedServer,
    PipelineConfig,
    PipelineError,
    cli_flags,
    free_port,
    load_config,
    report_markdown,
    run_pipeline,
    stop_on_signals,
)

__all__ = [
    "ManagedServer",
    "PipelineConfig",
    "PipelineError",
    "cli_flags",
    "free_port",
    "load_config",
    "report_markdown",
    "run_pipeline",
    "stop_on_signals",
]
