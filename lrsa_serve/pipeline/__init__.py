"""``lrsa pipeline``: train -> export -> serve -> eval -> report in one command (its modules:
docs/architecture.md)."""

from lrsa_serve.pipeline.cli import run_pipeline
from lrsa_serve.pipeline.config import PipelineConfig, load_config
from lrsa_serve.pipeline.processes import (
    ManagedServer,
    PipelineError,
    free_port,
    stop_on_signals,
)
from lrsa_serve.pipeline.report import report_markdown
from lrsa_serve.pipeline.stages import cli_flags

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
