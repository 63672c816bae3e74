"""PNG plots of an eval run (matplotlib, headless): accuracy vs kept ratio, a depth x length heat
map per target, and accuracy per task per target. matplotlib comes with the ``eval`` extra; without
it the plots are skipped with a note and everything else is still written."""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from lrsa_serve.eval.runner import EvalRun, cells, lookup


def pyplot(command: str) -> Any | None:
    """matplotlib.pyplot on the Agg backend (no display needed); None if it is not installed, said
    on stderr as ``command``."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        print(
            f"{command}: matplotlib is not installed; plots skipped (pip install "
            "'lrsa-serve[eval]')",
            file=sys.stderr,
        )
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_vs_ratio(plt: Any, run: EvalRun, path: Path) -> Path | None:
    """One panel per model: accuracy (mean over lengths) against the kept ratio, a line per task
    and a thick one for the mean. Targets whose setting is unknown are left out."""
    known = [t for t in run.targets if t.kept_ratio is not None]
    if not known:
        return None
    by_key = lookup(cells(run))
    models: dict[str, list] = defaultdict(list)
    for info in known:
        models[info.model or info.name].append(info)
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, (model, infos) in zip(axes[0], models.items(), strict=True):
        infos = sorted(infos, key=lambda info: info.kept_ratio)
        ratios = [info.kept_ratio for info in infos]
        for task in [*run.tasks, "mean"]:
            values = [by_key[(info.name, task, None)].score for info in infos]
            style = dict(color="black", linewidth=2.5) if task == "mean" else dict(alpha=0.8)
            ax.plot(ratios, values, marker="o", label=task, **style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(ratios)), [f"{r:g}" for r in sorted(set(ratios))])
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("kept ratio r (1 = uncompressed)")
        ax.set_ylabel("accuracy")
        ax.set_title(Path(model).name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    return save_figure(plt, fig, path)


def depth_heatmap(plt: Any, run: EvalRun, path: Path) -> Path | None:
    """Per target: accuracy of the depth-aware tasks for each needle depth (rows) and context
    length (columns), the cell value written in."""
    depth_items = [r for r in run.results if r.item.uses_depth]
    if not depth_items:
        return None
    depths = sorted({r.item.depth for r in depth_items})
    lengths = sorted({r.item.length for r in depth_items})
    scores: dict[tuple, list[float]] = defaultdict(list)
    for r in depth_items:
        scores[(r.target, r.item.depth, r.item.length)].append(r.score)
    count = len(run.targets)
    width = 1.2 + 1.1 * len(lengths) * count + 0.8 * count
    fig, axes = plt.subplots(1, count, figsize=(width, 0.6 * len(depths) + 2), squeeze=False)
    image = None
    for k, (ax, info) in enumerate(zip(axes[0], run.targets, strict=True)):
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for i, depth in enumerate(depths):
            for j, length in enumerate(lengths):
                cell = scores.get((info.name, depth, length))
                if cell:
                    grid[i][j] = sum(cell) / len(cell)
                text = f"{grid[i][j]:.0%}" if cell else "-"
                ax.text(j, i, text, ha="center", va="center", fontsize=8)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        if k == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(info.name, fontsize=9)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="accuracy (depth-aware tasks)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def accuracy_by_task(plt: Any, run: EvalRun, path: Path) -> Path | None:
    """Grouped bars: accuracy per task (mean over lengths), one bar per target."""
    if not run.targets:
        return None
    by_key = lookup(cells(run))
    tasks = [*run.tasks, "mean"]
    width = 0.8 / len(run.targets)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(tasks) * max(1, len(run.targets) / 2)), 4))
    for k, info in enumerate(run.targets):
        values = [by_key[(info.name, task, None)].score for task in tasks]
        positions = [i + (k - (len(run.targets) - 1) / 2) * width for i in range(len(tasks))]
        ax.bar(positions, values, width, label=info.name)
    ax.set_xticks(range(len(tasks)), tasks, rotation=25, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(plt, fig, path)


def draw_all(run: EvalRun, out_dir: Path) -> dict[str, Path]:
    """Every plot that has something to show, as ``out_dir/NAME.png``, by name."""
    plt = pyplot("lrsa eval")
    if plt is None:
        return {}
    drawn = {
        draw.__name__: draw(plt, run, out_dir / f"{draw.__name__}.png")
        for draw in (accuracy_vs_ratio, depth_heatmap, accuracy_by_task)
    }
    return {name: path for name, path in drawn.items() if path is not None}
