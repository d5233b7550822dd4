"""A folder saved by PRMTrainer is a reward function (issue 26): detected as a process reward model from its
saved config and scored per step (it was loaded as a one-score model: shape mismatch), in Python, through the
CLI's reward_model_path, and through the YAML {name: ...RewardModelScorer, kind: process, path: ...} form
(which returned the class uninstantiated)."""
from __future__ import annotations

import json

import pytest

from posttrain import PRMConfig, PRMTrainer
from posttrain.losses import aggregate_step_scores
from posttrain.online.rewards.inputs import split_steps
from posttrain.online.reward_model import RewardModelScorer
from posttrain.online.rewards import resolve_reward_func
from posttrain.tasks import ArithmeticTask
from posttrain.trainers.grpo import GRPOConfig, GRPOTrainer

from _online_helpers import _one_thread, history  # noqa: F401  (_one_thread: autouse)

SEPARATOR = "\n\n"  # not the default: the scorer must read it from the saved config


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prm")
    args = PRMConfig(output_dir=str(tmp / "run"), per_device_train_batch_size=8, learning_rate=1e-3, max_steps=2,
                     save_strategy="no", report_to="none", disable_tqdm=True, seed=0, max_length=96,
                     step_separator=SEPARATOR)
    trainer = PRMTrainer("tiny:nano", args=args, train_dataset=ArithmeticTask(digits=2, seed=0).stepwise(16))
    trainer.train()
    trainer.save_model(str(tmp / "prm"))
    trainer.tokenizer.save_pretrained(str(tmp / "prm"))
    return tmp / "prm"


def _completions():
    rows = ArithmeticTask(digits=2, seed=1).stepwise(4)
    return list(rows["prompt"]), [SEPARATOR.join(steps) for steps in rows["completions"]]


def test_prm_folder_is_detected_as_a_process_model_and_scored_per_step(prm_dir):
    scorer = RewardModelScorer(str(prm_dir))
    assert scorer.kind == "process" and scorer.step_separator == SEPARATOR
    prompts, completions = _completions()
    steps = [split_steps(c, SEPARATOR) for c in completions]
    per_step = scorer.score_steps_batch(prompts, steps)
    assert all(len(s) == len(t) > 1 for s, t in zip(per_step, steps))
    assert scorer(prompts, completions) == pytest.approx([aggregate_step_scores(s, "min") for s in per_step])
    # the same as resolving the folder as a reward function (Python's reward_funcs=path, the CLI's
    # reward_model_path)
    func = resolve_reward_func(str(prm_dir))
    assert isinstance(func, RewardModelScorer) and func.kind == "process"
    assert func(prompts, completions) == pytest.approx(scorer(prompts, completions))


def test_yaml_mapping_builds_the_scorer(prm_dir):
    spec = {"name": "posttrain.online.reward_model.RewardModelScorer", "kind": "process", "path": str(prm_dir),
            "aggregate": "last"}
    func = resolve_reward_func(spec)
    assert isinstance(func, RewardModelScorer) and (func.kind, func.aggregate) == ("process", "last")
    prompts, completions = _completions()
    last = [s[-1] for s in func.score_steps_batch(prompts, [split_steps(c, SEPARATOR) for c in completions])]
    assert func(prompts, completions) == pytest.approx(last)


def test_a_kind_contradicting_the_saved_model_is_an_error(prm_dir):
    with pytest.raises(ValueError, match="kind='outcome'.*token classifier.*kind='process'"):
        RewardModelScorer(str(prm_dir), kind="outcome")
    with pytest.raises(ValueError, match="model_or_path or as path"):
        RewardModelScorer()


def test_grpo_trains_a_step_on_a_prm_folder_from_python(tmp_path, prm_dir):
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), num_generations=4, per_device_train_batch_size=8,
                      max_completion_length=6, max_steps=1, logging_steps=1, report_to="none", save_strategy="no",
                      disable_tqdm=True, log_completions=False)
    trainer = GRPOTrainer("tiny:nano", str(prm_dir), args, train_dataset=ArithmeticTask(digits=2).prompt_only(8))
    (func,) = trainer.reward_composer.funcs
    assert isinstance(func, RewardModelScorer) and func.kind == "process"
    trainer.train()
    (reward,) = history(trainer, "rewards/prm/mean")
    assert 0.0 <= reward <= 1.0  # an aggregate of step probabilities


@pytest.mark.parametrize("form", ["reward_model_path", "yaml_mapping"])
def test_cli_grpo_with_a_prm_folder(tmp_path, prm_dir, form):
    from posttrain.cli import run_method

    rewards = (f"reward_funcs: []\nreward_model_path: {prm_dir}\n" if form == "reward_model_path" else
               "reward_funcs: [{name: posttrain.online.reward_model.RewardModelScorer, kind: process, "
               f"path: {prm_dir}}}]\n")
    config = tmp_path / "run.yaml"
    config.write_text(
        "model_name_or_path: tiny:nano\ntask_train_size: 8\ndataset_test_split: null\n" + rewards +
        "num_generations: 4\nper_device_train_batch_size: 8\nmax_completion_length: 4\nmax_steps: 1\n"
        "logging_steps: 1\nreport_to: none\nsave_strategy: 'no'\nlog_completions: false\n"
        f"output_dir: {tmp_path / 'out'}\n"
    )
    metrics = run_method("grpo", ["--config", str(config)])
    assert "train_loss" in metrics
    logs = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    (reward,) = [h["rewards/prm/mean"] for h in logs if "rewards/prm/mean" in h]
    assert 0.0 <= reward <= 1.0
