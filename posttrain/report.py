"""`posttrain report <run_dir>`: the final metrics of a run and a PNG of its curves, from the
`trainer_state.json` the Trainer writes with every checkpoint."""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import Sequence

__all__ = ["load_log_history", "report_main"]


def load_log_history(run_dir: str) -> list[dict]:
    """The log history of the newest `trainer_state.json` under `run_dir`."""
    paths = glob.glob(os.path.join(run_dir, "trainer_state.json")) + glob.glob(
        os.path.join(run_dir, "checkpoint-*", "trainer_state.json"))
    if not paths:
        raise FileNotFoundError(f"no trainer_state.json in {run_dir} or its checkpoint-* folders")
    newest = max(paths, key=lambda p: json.load(open(p)).get("global_step", 0))
    return json.load(open(newest))["log_history"]


def report_main(argv: Sequence[str]) -> int:
    """Print the last value of every logged metric and write `<run_dir>/curves.png`."""
    from .trainers.callbacks import format_metrics, plot_log_history

    if not argv or argv[0] in ("-h", "--help"):
        print("usage: posttrain report <run_dir> [metric ...]")
        return 0 if argv else 2
    run_dir, keys = argv[0], tuple(argv[1:]) or ("loss", "eval_loss")
    try:
        history = load_log_history(run_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    last: dict = {}
    for entry in history:
        last.update(entry)
    print(format_metrics(last))
    path = plot_log_history(history, os.path.join(run_dir, "curves.png"), keys)
    if path:
        print(f"curves: {path}")
    return 0
