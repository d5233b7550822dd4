"""`posttrain gkd | minillm | distill` on the built-in task with a tiny teacher, one YAML file each."""

from __future__ import annotations

import json

import pytest

from posttrain.cli import main

from _distill_helpers import TEACHER_SPEC
from _online_helpers import _one_thread  # noqa: F401  (autouse)

COMMON = ("model_name_or_path: tiny:nano\ntask_train_size: 16\nper_device_train_batch_size: 4\nmax_steps: 1\n"
          "logging_steps: 1\nreport_to: none\nsave_strategy: no\nmax_completion_length: 4\n"
          f"teacher_model_name_or_path: 'tiny:{TEACHER_SPEC}'\n")


@pytest.mark.parametrize("method,extra,metric", [
    ("gkd", "max_new_tokens: 4\nlmbda: 0.5\ntask_test_size: 4\n", "divergence"),
    ("distill", "dataset_test_split: none\n", "divergence"),
    ("minillm", "num_generations: 2\ndataset_test_split: none\nlog_completions: false\n", "single_step_kl"),
])
def test_cli_distillation_commands(tmp_path, method, extra, metric):
    out = tmp_path / "out"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(COMMON + extra + f"output_dir: {out}\n")
    assert main([method, f"--config={cfg}"]) == 0
    history = json.load(open(out / "trainer_state.json"))["log_history"]
    assert metric in history[0] and history[0]["loss"] >= 0
    if method == "gkd":
        assert history[-1]["eval_divergence"] > 0 and history[-1]["eval_on_policy"] == 0.0  # held-out completions
