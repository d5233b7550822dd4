"""Figures of training runs: one panel per thing a stage optimizes (loss, accuracy, reward per function, KL,
completion length), each drawn from a Trainer's `log_history`. Used by the quickstart and `posttrain report`."""

from __future__ import annotations

import fnmatch
import os
from typing import Sequence

__all__ = ["Panel", "plot_panels", "series"]

#: (title, log history, metric names or fnmatch patterns such as "rewards/*/mean")
Panel = tuple[str, list[dict], Sequence[str]]


def series(history: list[dict], patterns: Sequence[str]) -> dict[str, list[tuple[float, float]]]:
    """`{metric: [(step, value), ...]}` for every metric of `history` that matches one of `patterns`, in
    pattern order; metrics with no finite value are left out."""
    names: list[str] = []
    for pattern in patterns:
        for entry in history:
            for key in entry:
                if key not in names and key != "step" and fnmatch.fnmatchcase(key, pattern):
                    names.append(key)
    out = {}
    for name in names:
        points = [(e["step"], float(e[name])) for e in history
                  if "step" in e and isinstance(e.get(name), (int, float)) and e[name] == e[name]]
        if points:
            out[name] = points
    return out


def plot_panels(panels: Sequence[Panel], path: str, columns: int = 2) -> str | None:
    """Draw each panel that has data (a line per matching metric, against the step) into one PNG at `path`;
    returns the path, or None when no panel has data."""
    drawn = [(title, found) for title, history, keys in panels if (found := series(history, keys))]
    if not drawn:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(columns, len(drawn))
    rows = (len(drawn) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.2 * rows), dpi=110, squeeze=False)
    for ax in axes.flat[len(drawn):]:
        ax.set_visible(False)
    for ax, (title, found) in zip(axes.flat, drawn):
        for name, points in found.items():
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, ms=3, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
