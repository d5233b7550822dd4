"""Sample completions as a table: to the console (rich) and to the experiment trackers in ``report_to``.

Reading a few completions with their rewards and advantages every N steps is how people notice reward
hacking, format collapse or truncation early; the trainers call `log_completions` for that.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

logger = logging.getLogger(__name__)


def _clip(text: Any, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def completions_table_rows(
    prompts: Sequence[Any], completions: Sequence[str], rewards: dict[str, Sequence[float]],
    advantages: Sequence[float], limit: int | None = None,
) -> list[dict[str, Any]]:
    """Rows ``{"prompt", "completion", <reward name>..., "advantage"}`` for the first ``limit`` samples."""
    n = len(completions) if limit is None else min(limit, len(completions))
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"prompt": prompts[i], "completion": completions[i]}
        for name, values in rewards.items():  # reward columns, and the columns reward functions logged
            value = values[i] if i < len(values) else None
            row[name] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        row["advantage"] = float(advantages[i])
        rows.append(row)
    return rows


def print_completions_table(rows: list[dict[str, Any]], step: int, console: Any = None, width: int = 200) -> None:
    """A rich table of the rows on the console."""
    if not rows:
        return
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"sample completions at step {step}", show_lines=True)
    for key in rows[0]:
        numeric = isinstance(rows[0][key], float)
        table.add_column(key, justify="right" if numeric else "left", overflow="fold")
    for row in rows:
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else _clip(v, width) for v in row.values()])
    console.print(table)


def _markdown_table(columns: list[str], data: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in data])


def report_completions_table(rows: list[dict[str, Any]], step: int, report_to: Sequence[str],
                             callbacks: Sequence[Any] = ()) -> None:
    """Send the rows to wandb (``wandb.Table``) and trackio when they are in ``report_to`` and running, and to
    tensorboard as a markdown text summary ``completions`` through the writer of the trainer's tensorboard
    callback (one of ``callbacks``)."""
    if not rows:
        return
    columns = list(rows[0])
    data = [[row[c] if isinstance(row[c], (int, float)) else str(row[c]) for c in columns] for row in rows]
    if "tensorboard" in report_to:
        writer = next((cb.tb_writer for cb in callbacks if getattr(cb, "tb_writer", None) is not None), None)
        if writer is not None:
            writer.add_text("completions", _markdown_table(columns, data), global_step=step)
    if "wandb" in report_to:
        try:
            import wandb

            if wandb.run is not None:
                wandb.log({"completions": wandb.Table(columns=columns, data=data)}, step=step)
        except ImportError:
            pass
    if "trackio" in report_to:
        try:
            import trackio

            table_cls = getattr(trackio, "Table", None)
            if table_cls is not None:
                trackio.log({"completions": table_cls(columns=columns, data=data)}, step=step)
        except Exception as err:  # noqa: BLE001 - a tracker failing must not stop training
            logger.warning("could not log the completions table to trackio: %s", err)


def log_completions(rows: list[dict[str, Any]], step: int, report_to: Sequence[str] | str | None,
                    console: Any = None, callbacks: Sequence[Any] = ()) -> None:
    """Print the table and report it to the trackers (``callbacks``: the trainer's, where the tensorboard
    writer lives)."""
    report = [report_to] if isinstance(report_to, str) else list(report_to or [])
    print_completions_table(rows, step, console)
    report_completions_table(rows, step, report, callbacks)
