"""Trainer callbacks for what a user watches: a rich progress bar with the latest metrics, a compact log line,
a one-line summary at the end, and a PNG of the loss curve written next to the checkpoints."""

from __future__ import annotations

import math
import os
import time
from typing import Any

from transformers import TrainerCallback

__all__ = ["RichProgressCallback", "LossPlotCallback", "ReleaseBuffersCallback", "plot_log_history", "format_metrics"]

_SHOWN_KEYS = ("loss", "eval_loss", "mean_token_accuracy", "rewards/accuracies", "rewards/margins", "reward",
               "accuracy", "learning_rate", "grad_norm")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or math.isnan(value):
            return f"{value:g}"
        return f"{value:.3e}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4g}"
    return str(value)


def format_metrics(logs: dict[str, Any], keys: tuple[str, ...] | None = None) -> str:
    """A compact `key=value` line for a log dict; only `keys` (in order) when given."""
    items = [(k, logs[k]) for k in keys if k in logs] if keys else list(logs.items())
    return "  ".join(f"{k}={_fmt(v)}" for k, v in items)


class RichProgressCallback(TrainerCallback):
    """A rich progress bar for training and evaluation; each log is printed as one compact line above it."""

    def __init__(self) -> None:
        self._progress = None
        self._train_task = None
        self._eval_task = None
        self._start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("<"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=self._console, transient=False,
        )
        self._progress.start()
        self._train_task = self._progress.add_task("train", total=state.max_steps, info="")
        self._start = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if self._progress is not None:
            self._progress.update(self._train_task, completed=state.global_step)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self._progress is None or eval_dataloader is None:
            return
        if self._eval_task is None:
            total = len(eval_dataloader) if hasattr(eval_dataloader, "__len__") else None
            self._eval_task = self._progress.add_task("eval", total=total, info="")
        self._progress.advance(self._eval_task)

    def on_evaluate(self, args, state, control, **kwargs):
        if self._progress is not None and self._eval_task is not None:
            self._progress.remove_task(self._eval_task)
        self._eval_task = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        logs = {k: v for k, v in logs.items() if k != "total_flos"}
        line = f"step {state.global_step}: " + format_metrics(logs)
        if self._progress is not None:
            self._progress.console.print(line, highlight=False)
            self._progress.update(self._train_task, info=format_metrics(logs, ("loss", "eval_loss")))
        else:
            print(line, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self._progress is None:
            return
        self._progress.stop()
        last = {}
        for entry in state.log_history:
            last.update(entry)
        elapsed = time.time() - self._start
        summary = format_metrics(last, _SHOWN_KEYS)
        self._console.print(
            f"[bold green]done[/]: {state.global_step} steps in {elapsed:.1f}s  {summary}  -> {args.output_dir}",
            highlight=False,
        )
        self._progress = None


def plot_log_history(log_history: list[dict], path: str, keys: tuple[str, ...] = ("loss", "eval_loss")) -> str | None:
    """Plot the given metrics of a Trainer's `log_history` against the step; returns the PNG path or None."""
    series = {k: [(e["step"], e[k]) for e in log_history if k in e and "step" in e] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for key, points in series.items():
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, ms=3, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("value")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


class ReleaseBuffersCallback(TrainerCallback):
    """Frees the buffers the ops keep from step to step (the log-softmax's spare probabilities) at the end."""

    def on_train_end(self, args, state, control, **kwargs):
        from ..ops.logprobs import release_kept_buffers

        release_kept_buffers()


class LossPlotCallback(TrainerCallback):
    """Writes `<output_dir>/loss_curve.png` at the end of training (train and eval loss per step)."""

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and args.output_dir:
            plot_log_history(state.log_history, os.path.join(args.output_dir, "loss_curve.png"))
