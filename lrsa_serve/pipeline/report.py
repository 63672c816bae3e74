"""``OUT/report.md``: training summary and accuracy per task x length, against the base model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lrsa_serve.pipeline.config import PipelineConfig


def report_markdown(
    config: PipelineConfig,
    settings: Any,
    run: Any,
    training: dict[str, dict],
    plots: dict[str, Path],
    out: Path,
) -> str:
    from lrsa_serve.eval import report as eval_report
    from lrsa_serve.eval.runner import cells, lookup

    by_key = lookup(cells(run))
    names = [info.name for info in run.targets]
    trained = [name for name in names if name in training]

    def delta(name: str, task: str, length: int | None) -> str:
        new, old = by_key.get((name, task, length)), by_key.get(("base", task, length))
        if new is None or old is None:
            return "-"
        return f"{100 * (new.score - old.score):+.0f}"

    header = ["task", "length", *names, *(f"{n} vs base (points)" for n in trained)]
    rows = [
        [
            task,
            eval_report.length_label(length),
            *(eval_report.format_cell(by_key.get((n, task, length)), of_n=False) for n in names),
            *(delta(n, task, length) for n in trained),
        ]
        for task, length in eval_report.row_keys(run)
    ]
    train_rows = [
        [
            name,
            str(s.get("step", "-")),
            f"{s['loss']:.4f}" if "loss" in s else "-",
            f"{s['eval_exact_match']:.0%}" if "eval_exact_match" in s else "-",
            os.path.relpath(s["checkpoint"], out),
        ]
        for name, s in training.items()
    ]
    section = config.eval
    intro = (
        f"Base model `{run.targets[0].model}` ({config.model or 'the default model'}); every "
        f"model served by `lrsa serve` under LagKV {settings.short()}. Eval: API "
        f"`{section.api}`, tasks {', '.join(run.config['tasks'])}; lengths {section.lengths} "
        f"tokens; depths {section.depths}; {section.samples} sample(s) per cell, from the eval "
        "seed split (never trained on). Accuracy = mean partial-credit score; failed requests "
        "count as 0."
    )
    # The trainer's own evaluation runs each variant under the attention it trained with (dense
    # or LRSA), uncompressed for dense: not comparable across variants, unlike the table below.
    train_header = (
        "variant|steps|final loss|held-out exact match (teacher forcing, own attention)|checkpoint"
    )
    train_table = (
        eval_report.markdown_table(train_header.split("|"), train_rows) if train_rows else "(none)"
    )
    sections = [
        f"# Pipeline report: {config.name}",
        intro,
        "## Training",
        train_table,
        "## Accuracy",
        eval_report.markdown_table(header, rows),
        "## Models",
        "\n".join(f"- {line}" for line in eval_report.target_lines(run)),
    ]
    return eval_report.document(sections, run, plots, out)
