"""`posttrain report`: the curves it draws are the ones a run optimizes (reward, KL and completion length for
an online run; loss, accuracies and margins for an offline one), from the run's trainer_state.json."""

from __future__ import annotations

import json

from posttrain.cli import main
from posttrain.plots import series
from posttrain.report import report_panels

ONLINE = [{"step": s, "loss": 0.1, "reward": 0.2 * s, "rewards/arithmetic/mean": 0.1 * s, "rewards/arithmetic/std": 0.3,
           "reward_std": 0.4, "kl": 0.01 * s, "completions/mean_length": 20.0 + s, "completions/min_length": 3.0,
           "completions/max_length": 64.0, "learning_rate": 1e-5} for s in (1, 2, 3)]
OFFLINE = [{"step": s, "loss": 1.0 / s, "rewards/accuracies": 0.5 + 0.1 * s, "rewards/margins": 0.2 * s,
            "rewards/chosen": -1.0, "learning_rate": 1e-5} for s in (1, 2, 3)] + [
    {"step": 3, "eval_loss": 0.4, "eval_rewards/accuracies": 0.7, "eval_rewards/margins": 0.5}]


def _drawn(history):
    return {title: sorted(series(h, keys)) for title, h, keys in report_panels(history) if series(h, keys)}


def test_online_run_gets_reward_kl_and_length_curves():
    drawn = _drawn(ONLINE)
    assert drawn["reward"] == ["reward", "rewards/arithmetic/mean"]
    assert drawn["KL to the reference"] == ["kl"]
    assert drawn["completion length (tokens)"] == ["completions/max_length", "completions/mean_length",
                                                   "completions/min_length"]
    assert series(ONLINE, ("kl",))["kl"] == [(1, 0.01), (2, 0.02), (3, 0.03)]


def test_offline_run_gets_loss_accuracy_and_margin_curves_train_and_eval():
    drawn = _drawn(OFFLINE)
    assert drawn == {"loss": ["eval_loss", "loss"], "accuracy": ["eval_rewards/accuracies", "rewards/accuracies"],
                     "margin": ["eval_rewards/margins", "rewards/margins"]}


def test_report_writes_the_panels_png(tmp_path, capsys):
    for name, history in (("online", ONLINE), ("offline", OFFLINE)):
        run = tmp_path / name
        run.mkdir()
        (run / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": history}))
        assert main(["report", str(run)]) == 0
        assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "reward=0.6" in capsys.readouterr().out
