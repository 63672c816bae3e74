"""Summaries of an eval run: the task x length x setting table, failures, JSON and Markdown.

A cell's accuracy is the mean ``score`` (partial credit, see ``scoring``) over its items, failed
requests counted as 0; ``exact`` is the fraction fully right; ``failed`` counts the requests that
got no answer. Failure messages are grouped by their shape (numbers masked), so a hundred
"HTTP 400: ... 5000 tokens ..." lines read as one line with a count.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lrsa_serve.eval.plots import draw_all
from lrsa_serve.eval.runner import Cell, EvalRun, cells, lookup

JSON_VERSION = 1


def format_cell(cell: Cell | None, of_n: bool = True) -> str:
    """``75%``, with the failed requests after it (``(2/8 failed)``, or ``(2 failed)``)."""
    if cell is None:
        return "-"
    text = f"{cell.score:.0%}"
    if cell.failed:
        text += f" ({cell.failed}/{cell.n} failed)" if of_n else f" ({cell.failed} failed)"
    return text


def row_keys(run: EvalRun) -> list[tuple[str, int | None]]:
    """The (task, length) of each table row: a task's lengths, then with several of them the
    task over all lengths (None); last the mean over everything."""
    per_task = [*run.lengths, None] if len(run.lengths) > 1 else run.lengths
    return [(task, length) for task in run.tasks for length in per_task] + [("mean", None)]


def length_label(length: int | None) -> str:
    return "all" if length is None else str(length)


def table_rows(run: EvalRun) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per task x length, one column per target, plus per-task and
    overall means."""
    by_key = lookup(cells(run))
    names = [t.name for t in run.targets]
    rows = [
        [task, length_label(length), *(format_cell(by_key.get((n, task, length))) for n in names)]
        for task, length in row_keys(run)
    ]
    return ["task", "length", *names], rows


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            str(v).ljust(w) if i < 2 else str(v).rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

    align = ["---", "---:"] + ["---:"] * (len(header) - 2)
    return "\n".join([line(header), "|" + "|".join(align) + "|", *map(line, rows)])


# ---- failures ---------------------------------------------------------------------------------
def failures(run: EvalRun) -> dict[str, dict[str, Any]]:
    """Per target with failures: how many, per task, and the distinct messages (grouped by shape,
    most frequent first, one real example each)."""
    out: dict[str, dict[str, Any]] = {}
    for info in run.targets:
        failed = [r for r in run.results if r.target == info.name and r.failed]
        if not failed:
            continue
        shapes: Counter[str] = Counter()
        example: dict[str, str] = {}
        for result in failed:
            message = result.answer.error or "no answer"
            shape = re.sub(r"\d+(\.\d+)?", "N", message)  # numbers masked
            shapes[shape] += 1
            example.setdefault(shape, message)
        out[info.name] = {
            "failed": len(failed),
            "requests": sum(r.target == info.name for r in run.results),
            "by_task": dict(Counter(r.item.task for r in failed)),
            "messages": [{"count": n, "message": example[s]} for s, n in shapes.most_common()],
        }
    return out


def failure_lines(run: EvalRun) -> list[str]:
    lines = []
    for name, summary in failures(run).items():
        tasks = ", ".join(f"{task} {n}" for task, n in summary["by_task"].items())
        lines.append(
            f"{name}: {summary['failed']} of {summary['requests']} requests failed ({tasks})"
        )
        for entry in summary["messages"][:8]:
            lines.append(f"  {entry['count']:>4}x  {entry['message']}")
        if len(summary["messages"]) > 8:
            lines.append(f"  ... {len(summary['messages']) - 8} more kinds of failure in the JSON")
    return lines


def target_lines(run: EvalRun) -> list[str]:
    lines = []
    for info in run.targets:
        where = info.url or "in-process engine"
        lines.append(f"{info.name}: {info.model} at {where}, LagKV {info.setting}")
        lines += [f"  note: {note}" for note in info.notes]
    return lines


def document(
    sections: list[str], run: EvalRun, plots: dict[str, Path] | None, base: Path | None = None
) -> str:
    """A Markdown report: ``sections`` a blank line apart, then the failures and the plots, ending
    in a newline. Plots are linked relative to ``base``, the report's folder (default: beside the
    plots)."""
    sections = list(sections)
    if lines := failure_lines(run):
        sections += ["## Failures", "\n".join(["```", *lines, "```"])]
    if plots:
        links = [f"![{name}]({os.path.relpath(path, base or path.parent)})"
                 for name, path in plots.items()]  # fmt: skip
        sections += ["## Plots", "\n".join(links)]
    return "\n\n".join(sections) + "\n"


# ---- files ------------------------------------------------------------------------------------
def to_json(run: EvalRun) -> dict[str, Any]:
    return {
        "version": JSON_VERSION,
        "config": run.config,
        "targets": [info.to_dict() for info in run.targets],
        "summary": [asdict(cell) for cell in cells(run)],
        "failures": failures(run),
        "items": [result.to_dict() for result in run.results],
    }


def markdown(run: EvalRun, plots: dict[str, Path] | None = None) -> str:
    header, rows = table_rows(run)
    config = run.config
    sections = [
        "# lrsa eval",
        f"Tasks {', '.join(config.get('tasks', []))}; lengths {config.get('lengths')} tokens; "
        f"depths {config.get('depths')}; {config.get('samples')} sample(s) per cell; "
        f"API {config.get('api')}; seed {config.get('seed')}. Accuracy = mean partial-credit "
        "score (fraction of expected values recalled), failed requests count as 0.",
        "## Targets",
        "\n".join(f"- {line}" for line in target_lines(run)),
        "## Accuracy",
        markdown_table(header, rows),
    ]
    return document(sections, run, plots)


def write_outputs(run: EvalRun, out_dir: Path, *, draw: bool = True) -> dict[str, Path]:
    """results.json, report.md and the plots into ``out_dir``; returns what was written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = draw_all(run, out_dir) if draw else {}
    written = {"json": out_dir / "results.json", "markdown": out_dir / "report.md"}
    written["json"].write_text(json.dumps(to_json(run), indent=2) + "\n")
    written["markdown"].write_text(markdown(run, plots))
    return written | plots
