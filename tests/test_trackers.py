"""`report_to` trackio (local), tensorboard and wandb (offline) receive a GRPO run's training metrics and
its completions table: one tiny run reports to all three, then each test reads what that tracker wrote."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _tracker_helpers import tensorboard_tags, trackio_logs, wandb_history

pytest.importorskip("trackio")
pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

ROOT = Path(__file__).parents[1]
# the names users look for (transformers prefixes "train/" on the trackers)
METRICS = ("train/loss", "train/learning_rate", "train/reward", "train/reward_std", "train/kl",
           "train/completions/mean_length", "train/rewards/arithmetic/mean")


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tracked")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TRACKIO_DIR": str(out / "trackio"),
           "TENSORBOARD_LOGGING_DIR": str(out / "tb"), "WANDB_MODE": "offline", "WANDB_DIR": str(out / "wandb"),
           "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "tracked_grpo.py"), str(out / "run"),
                           "trackio,tensorboard,wandb"], env=env, cwd=out, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.slow
def test_trackio_receives_metrics_and_completions_table(tracked_run):
    logs = trackio_logs(tracked_run / "trackio", "posttrain-test")
    metrics = [e for e in logs if "train/loss" in e]
    assert len(metrics) == 2 and [e["step"] for e in metrics] == [1, 2]
    assert all(name in metrics[-1] for name in METRICS), sorted(metrics[-1])
    assert metrics[-1]["train/completions/mean_length"] > 0 and metrics[-1]["train/learning_rate"] == pytest.approx(1e-3, rel=0.5)
    tables = [e["completions"] for e in logs if "completions" in e]
    assert tables and tables[-1]["_type"] == "trackio.table"
    rows = tables[-1]["_value"]
    assert len(rows) == 2 and {"prompt", "completion", "arithmetic", "advantage"} <= set(rows[0])
    assert rows[0]["prompt"].startswith("What is")


@pytest.mark.slow
def test_tensorboard_receives_metrics_and_completions_text(tracked_run):
    scalars, texts = tensorboard_tags(tracked_run / "tb")
    assert all(len(scalars.get(name, [])) == 2 for name in METRICS), sorted(scalars)
    assert scalars["train/completions/mean_length"][-1] > 0
    table = texts["completions/text_summary"][-1]
    assert table.startswith("| prompt | completion |") and "What is" in table


@pytest.mark.slow
def test_wandb_offline_receives_metrics_and_completions_table(tracked_run):
    (run_dir,) = glob.glob(str(tracked_run / "wandb" / "wandb" / "offline-run-*"))
    history = wandb_history(Path(run_dir))
    metrics = [row for row in history if "train/loss" in row]
    assert len(metrics) == 2 and all(name in metrics[-1] for name in METRICS), sorted(metrics[-1])
    assert any(row.get("completions/_type") == "table-file" for row in history)
    (table_file,) = glob.glob(os.path.join(run_dir, "files", "media", "table", "completions_*.table.json"))[-1:]
    table = json.loads(Path(table_file).read_text())
    assert table["columns"][:2] == ["prompt", "completion"] and table["data"][0][0].startswith("What is")
