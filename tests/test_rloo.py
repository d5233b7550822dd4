"""RLOO trainer: learning, KL in the reward or in the loss, advantage normalization, reward_model=."""

from __future__ import annotations

import pytest
import torch

from posttrain.models import build_tiny
from posttrain.online.logprobs import completion_mask
from posttrain.online.rollout_batch import RolloutBatch
from posttrain.tasks import ArithmeticTask
from posttrain.trainers.rloo import RLOOConfig, RLOOTrainer

from _online_helpers import _one_thread, digit_share, history, scored_with  # noqa: F401  (_one_thread: autouse)


def _config(**kw):
    base = dict(output_dir="/tmp/posttrain-test-rloo", num_generations=4, per_device_train_batch_size=8,
                max_completion_length=6, max_steps=2, logging_steps=1, report_to="none", learning_rate=1e-2,
                log_completions=False, save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant", beta=0.0)
    base.update(kw)
    return RLOOConfig(**base)


def _data(n=64):
    return ArithmeticTask(digits=2).prompt_only(n)


def test_rloo_raises_mean_reward():
    model, tok = build_tiny("nano")
    args = _config(per_device_train_batch_size=16, max_completion_length=8, max_steps=16, learning_rate=3e-2,
                   logging_steps=4)
    trainer = RLOOTrainer(model, digit_share, args, train_dataset=_data(200), processing_class=tok)
    trainer.train()
    rewards = history(trainer, "reward")
    print(f"RLOO HFEngine: reward {rewards[0]:.3f} -> {rewards[-1]:.3f}")
    assert rewards[0] < 0.05 and rewards[-1] > 0.5, rewards


def _batch_for(trainer, rewards, old, ref):
    n, width = old.shape
    mask = completion_mask([width] * n).float()
    return RolloutBatch([[1]] * n, [[2] * width] * n, mask, torch.zeros(n), old_logps=old, ref_logps=ref)


def test_kl_in_reward_uses_sequence_kl_and_leave_one_out():
    model, tok = build_tiny("nano")
    trainer = RLOOTrainer(model, digit_share, _config(beta=0.5, num_generations=2), train_dataset=_data(),
                          processing_class=tok)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    old = torch.tensor([[-1.0, -1.0], [-2.0, -1.0], [-0.5, -0.5], [-1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0], [-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]])
    adv, metrics = trainer.compute_advantages(scored_with(rewards, 2), _batch_for(trainer, rewards, old, ref))
    kl = [(-1 + 1.5) + 0.0, (-2 + 1) + 0.0, 0.5 + 0.5, 0.0]
    shaped = [r - 0.5 * k for r, k in zip(rewards.tolist(), kl)]
    expected = [shaped[0] - shaped[1], shaped[1] - shaped[0], shaped[2] - shaped[3], shaped[3] - shaped[2]]
    assert adv.tolist() == pytest.approx(expected)
    assert metrics["kl"] == pytest.approx(sum(kl) / 8) and metrics["kl/sequence_mean"] == pytest.approx(sum(kl) / 4)
    # normalized advantages are whitened
    trainer.args.normalize_advantages = True
    adv, _ = trainer.compute_advantages(scored_with(rewards, 2), _batch_for(trainer, rewards, old, ref))
    assert adv.mean().item() == pytest.approx(0.0, abs=1e-6) and adv.std().item() == pytest.approx(1.0, abs=1e-4)


def test_kl_in_loss_variant_logs_kl_and_reward_model_kwarg():
    from posttrain.models.loading import load_model

    model, tok = build_tiny("nano")
    reward_model = load_model("tiny:nano", task="seq-cls")
    args = _config(beta=0.1, kl_in_reward=False, max_steps=2, learning_rate=5e-2)
    trainer = RLOOTrainer(model, args=args, train_dataset=_data(), processing_class=tok, reward_model=reward_model,
                          reward_processing_classes=tok)
    assert len(trainer.reward_composer.names) == 1  # the reward model is the only reward
    trainer.train()
    kls = history(trainer, "kl")
    assert len(kls) == 2 and kls[0] == pytest.approx(0.0, abs=1e-6) and kls[1] > 0
    assert len(history(trainer, "reward")) == 2


def test_rloo_needs_two_generations():
    with pytest.raises(ValueError, match="RLOO needs >= 2"):
        _config(num_generations=1, per_device_train_batch_size=2)


def test_cli_rloo_with_rewards_and_flags(tmp_path):
    from posttrain.cli import run_method

    config = tmp_path / "run.yaml"
    config.write_text(
        "model_name_or_path: tiny:nano\ntask_train_size: 16\ndataset_test_split: null\n"
        "reward_funcs: [arithmetic_steps, _online_helpers:digit_share]\nnum_generations: 2\n"
        "per_device_train_batch_size: 4\nmax_completion_length: 4\nmax_steps: 2\nreport_to: none\n"
        f"save_strategy: 'no'\nlog_completions: false\noutput_dir: {tmp_path / 'out'}\n"
    )
    metrics = run_method("rloo", ["--config", str(config), "--beta", "0.1", "--kl_in_reward", "false"])
    assert "train_loss" in metrics
    assert (tmp_path / "out" / "config.json").exists()
