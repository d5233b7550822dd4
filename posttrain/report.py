"""`posttrain report <run_dir>`: the final metrics of a run and a PNG of its curves, from the
`trainer_state.json` the Trainer writes with every checkpoint. The CLI saves the run folder's own state after
the final evaluation, so its last `eval_*` entry is the final eval, which the report shows on its own line."""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import Sequence

__all__ = ["final_eval", "load_log_history", "report_main", "report_panels"]


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def load_log_history(run_dir: str) -> list[dict]:
    """The log history of the newest `trainer_state.json` under `run_dir` (the run folder's own on a tie with a
    checkpoint: it is saved last, after the final evaluation)."""
    own = os.path.join(run_dir, "trainer_state.json")
    paths = ([own] if os.path.exists(own) else []) + sorted(
        glob.glob(os.path.join(run_dir, "checkpoint-*", "trainer_state.json")))
    if not paths:
        raise FileNotFoundError(f"no trainer_state.json in {run_dir} or its checkpoint-* folders")
    states = [_read(p) for p in paths]
    newest = max(range(len(paths)), key=lambda i: (states[i].get("global_step", 0), -i))
    return states[newest]["log_history"]


def final_eval(history: list[dict]) -> dict:
    """The `eval_*` metrics (and step) of the last evaluation in a log history; empty without one."""
    for entry in reversed(history):
        if any(k.startswith("eval_") for k in entry):
            return {k: v for k, v in entry.items() if k.startswith("eval_") or k == "step"}
    return {}


def report_panels(history: list[dict]) -> list:
    """The panels `posttrain report` draws for a run: for an online run (it logged ``reward``) the reward (total
    and per function), the KL to the reference, the completion lengths and the loss; for an offline run the
    loss, the accuracies and the margins (TRL's ``rewards/accuracies``, ``rewards/margins``, SFT's token
    accuracy, the reward model's ``accuracy`` / ``margin``), train and eval. Panels without data are dropped
    when drawn."""
    if any("reward" in entry for entry in history):
        return [("reward", history, ("reward", "rewards/*/mean", "eval_reward")),
                ("KL to the reference", history, ("kl", "eval_kl")),
                ("completion length (tokens)", history, ("completions/mean_length", "completions/min_length",
                                                         "completions/max_length")),
                ("loss", history, ("loss",))]
    return [("loss", history, ("loss", "eval_loss")),
            ("accuracy", history, ("*accuracies", "*accuracy", "heldout_exact_match")),
            ("margin", history, ("*margins", "*margin"))]


def report_main(argv: Sequence[str]) -> int:
    """Print the last value of every logged metric and write `<run_dir>/curves.png`: the panels of
    `report_panels`, or one plot of the metrics named after the run folder."""
    from .plots import plot_panels
    from .trainers.callbacks import format_metrics, plot_log_history

    if not argv or argv[0] in ("-h", "--help"):
        print("usage: posttrain report <run_dir> [metric ...]")
        return 0 if argv else 2
    run_dir, keys = argv[0], tuple(argv[1:])
    try:
        history = load_log_history(run_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    last: dict = {}
    for entry in history:
        last.update(entry)
    print(format_metrics(last))
    evaluation = final_eval(history)
    if evaluation:
        step = evaluation.pop("step", None)
        print(f"final eval (step {step}): {format_metrics(evaluation)}")
    target = os.path.join(run_dir, "curves.png")
    path = plot_log_history(history, target, keys) if keys else plot_panels(report_panels(history), target)
    if path:
        print(f"curves: {path}")
    return 0
