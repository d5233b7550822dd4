"""compute_metrics and predict() (issue 26): the trainers with per-example predictions hand compute_metrics an
EvalPrediction and predict() returns them (reward model: the [N, 2] chosen/rejected scores; PRM: the token
classifier's logits and step labels; SFT: TRL's logits and labels); the others refuse compute_metrics up front
instead of accepting it and never calling it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from posttrain import (CPOConfig, CPOTrainer, DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, PRMConfig, PRMTrainer,
                       RewardConfig, RewardTrainer, SFTConfig, SFTTrainer)
from posttrain.online.rewards.inputs import encode_outcome
from posttrain.online.rewards.reward_model import score_outcomes, score_steps_batch
from posttrain.tasks import ArithmeticTask
from posttrain.trainers.grpo import GRPOConfig, GRPOTrainer

from _online_helpers import _one_thread, digit_share  # noqa: F401  (_one_thread: autouse)


class Recorder:
    """A compute_metrics that keeps what it was given and returns one number."""

    def __init__(self):
        self.calls = []

    def __call__(self, prediction):
        self.calls.append(prediction)
        return {"seen": float(len(prediction.predictions))}


def _args(cls, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=2,
                max_steps=1, learning_rate=1e-3, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
                max_length=128)
    base.update(kw)
    return cls(**base)


@pytest.fixture(scope="module")
def task():
    return ArithmeticTask(digits=2, seed=0)


# ------------------------------------------------------------------------------------------ reward model
def test_reward_compute_metrics_gets_chosen_and_rejected_scores_and_predict_returns_them(tmp_path, task):
    pairs, held_out = task.preference(8), task.preference(13).select(range(8, 13))  # 5 pairs: batches 2, 2, 1
    metrics = Recorder()
    trainer = RewardTrainer("tiny:nano", args=_args(RewardConfig, tmp_path), train_dataset=pairs,
                            eval_dataset=held_out, compute_metrics=metrics)
    trainer.train()
    out = trainer.evaluate()
    assert len(metrics.calls) == 1 and out["eval_seen"] == 5.0
    got = metrics.calls[0]
    assert got.predictions.shape == (5, 2) and got.label_ids.tolist() == [0] * 5
    # the scores are the model's own: each completion scored alone, in dataset order, chosen then rejected
    prompts = list(held_out["prompt"])
    chosen = score_outcomes(trainer.model, trainer.tokenizer, prompts, list(held_out["chosen"]), max_length=128)
    rejected = score_outcomes(trainer.model, trainer.tokenizer, prompts, list(held_out["rejected"]), max_length=128)
    np.testing.assert_allclose(got.predictions, np.array([chosen, rejected]).T, atol=1e-5)
    with torch.no_grad():
        ids = encode_outcome(trainer.tokenizer, prompts[0], held_out[0]["chosen"], max_length=128)["input_ids"]
        assert got.predictions[0, 0] == pytest.approx(trainer.model(torch.tensor([ids])).logits[0, 0].item(), abs=1e-5)
    accuracy = float(np.mean(got.predictions.argmax(1) == got.label_ids))
    assert accuracy == pytest.approx(np.mean(np.array(chosen) > np.array(rejected)))
    predicted = trainer.predict(trainer.eval_dataset)  # prepared rows, as evaluate() takes them
    np.testing.assert_allclose(predicted.predictions, got.predictions, atol=1e-6)
    assert predicted.metrics["test_seen"] == 5.0 and "test_loss" in predicted.metrics


def test_reward_predict_without_compute_metrics_returns_the_scores(tmp_path, task):
    pairs = task.preference(6)
    trainer = RewardTrainer("tiny:nano", args=_args(RewardConfig, tmp_path), train_dataset=pairs)
    predicted = trainer.predict(trainer.train_dataset)
    chosen = score_outcomes(trainer.model, trainer.tokenizer, list(pairs["prompt"]), list(pairs["chosen"]),
                            max_length=128)
    assert predicted.predictions.shape == (6, 2)
    np.testing.assert_allclose(predicted.predictions[:, 0], chosen, atol=1e-5)


# ------------------------------------------------------------------------------------------------- PRM
def test_prm_compute_metrics_gets_logits_and_step_labels(tmp_path, task):
    steps = task.stepwise(5)
    metrics = Recorder()
    trainer = PRMTrainer("tiny:nano", args=_args(PRMConfig, tmp_path), train_dataset=steps, eval_dataset=steps,
                         compute_metrics=metrics)
    trainer.evaluate()
    got = metrics.calls[0]
    assert got.predictions.ndim == 3 and got.predictions.shape[0] == 5 and got.predictions.shape[2] == 2
    assert got.label_ids.shape == got.predictions.shape[:2]
    probs = score_steps_batch(trainer.model, trainer.tokenizer, list(steps["prompt"]), list(steps["completions"]),
                              max_length=128)
    for i, row in enumerate(steps):
        at = got.label_ids[i] != -100  # the separator after each step
        assert got.label_ids[i][at].tolist() == [int(y) for y in row["labels"]]
        logits = got.predictions[i][at]
        step_probs = 1 / (1 + np.exp(-(logits[:, 1] - logits[:, 0])))
        np.testing.assert_allclose(step_probs, probs[i], atol=1e-5)


# ------------------------------------------------------------------------------------------------- SFT
@pytest.mark.parametrize("padding_free", [True, False])
def test_sft_compute_metrics_gets_trls_logits_and_labels(tmp_path, task, padding_free):
    rows = task.split(0, 5, train_format="prompt_only", test_format="prompt_completion")["test"]
    metrics = Recorder()
    trainer = SFTTrainer("tiny:nano", args=_args(SFTConfig, tmp_path, padding_free=padding_free,
                                                 per_device_eval_batch_size=8),
                         train_dataset=rows, eval_dataset=rows, compute_metrics=metrics)
    out = trainer.evaluate()
    got = metrics.calls[0]
    vocab = trainer.model.config.vocab_size
    assert got.predictions.shape[0] == 5 and got.predictions.shape[2] == vocab
    assert got.label_ids.shape == got.predictions.shape[:2]
    for i in range(5):  # every row's logits are the model's on that row alone; labels are its completion ids
        row = trainer.eval_dataset[i]
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            alone = trainer.model(input_ids=ids).logits[0].numpy()
        n = len(row["input_ids"])
        np.testing.assert_allclose(got.predictions[i, :n], alone, atol=1e-4)
        want = [t if m else -100 for t, m in zip(row["input_ids"], row["completion_mask"])]
        want[0] = -100  # the first token has no prediction
        assert got.label_ids[i, :n].tolist() == want and (got.label_ids[i, n:] == -100).all()
    # what TRL users compute from it: token accuracy, equal to the eval_mean_token_accuracy posttrain logs
    preds, labels = got.predictions.argmax(-1)[:, :-1], got.label_ids[:, 1:]
    mask = labels != -100
    assert float((preds == labels)[mask].mean()) == pytest.approx(out["eval_mean_token_accuracy"], abs=1e-6)


def test_sft_predictions_with_packing_are_refused(tmp_path, task):
    rows = task.split(0, 4, train_format="prompt_only", test_format="prompt_completion")["test"]
    trainer = SFTTrainer("tiny:nano", args=_args(SFTConfig, tmp_path, packing=True), train_dataset=rows,
                         eval_dataset=rows, compute_metrics=Recorder())
    with pytest.raises(ValueError, match="packing"):
        trainer.evaluate()


# ------------------------------------------------------------------------------------- the others refuse
@pytest.mark.parametrize("trainer_cls,config_cls", [(DPOTrainer, DPOConfig), (CPOTrainer, CPOConfig),
                                                    (KTOTrainer, KTOConfig)])
def test_preference_trainers_refuse_compute_metrics_up_front(tmp_path, task, trainer_cls, config_cls):
    with pytest.raises(ValueError, match=f"{trainer_cls.__name__} does not take compute_metrics"):
        trainer_cls("tiny:nano", args=_args(config_cls, tmp_path), train_dataset=task.preference(4),
                    compute_metrics=Recorder())


def test_online_trainers_refuse_compute_metrics(tmp_path, task):
    """GRPOTrainer has TRL's explicit signature, which has no metrics hooks: passing one is a TypeError (as in
    TRL), never silently ignored."""
    args = GRPOConfig(output_dir=str(tmp_path / "g"), num_generations=4, per_device_train_batch_size=8,
                      report_to="none", disable_tqdm=True)
    with pytest.raises(TypeError, match="preprocess_logits_for_metrics"):
        GRPOTrainer("tiny:nano", digit_share, args, train_dataset=task.prompt_only(8),
                    preprocess_logits_for_metrics=lambda logits, labels: logits)
