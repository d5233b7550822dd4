"""Online DPO: best-vs-worst pairs, TRL's signature and metric names, per-epoch beta, missing_eos_penalty,
reference model or disabled adapters, pairs kept whole, the loss wired to `online_dpo_loss`, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain import OnlineDPOConfig, OnlineDPOTrainer, RewardFunctionJudge
from posttrain.losses.online_preference import online_dpo_loss
from posttrain.models import build_tiny

from _online_helpers import _one_thread, history, text_length  # noqa: F401  (_one_thread: autouse)
from _online_pref_helpers import paired_batch, prompts, short_config

TRL_METRICS = ("objective/kl", "objective/entropy", "objective/scores", "objective/scores_margin", "rewards/chosen",
               "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
               "val/contain_eos_token", "beta")


def test_best_vs_worst_of_each_prompt_and_trl_metrics():
    model, tok = build_tiny("nano")
    args = short_config(OnlineDPOConfig, num_generations=4, max_steps=2)
    trainer = OnlineDPOTrainer(model, reward_funcs=text_length, args=args, train_dataset=prompts(), processing_class=tok)
    rows = [trainer.train_dataset[i] for i in range(3)]
    rollout = trainer.rollout(rows, "train")
    scored = trainer.score(rows, rollout, "train")
    assert len(scored) == 6 and scored.rollout.prompt_index == [0, 0, 1, 1, 2, 2]
    for k in range(3):
        lengths = [len(t) for j, t in enumerate(rollout.texts) if rollout.prompt_index[j] == k]
        chosen, rejected = scored.rollout.texts[2 * k], scored.rollout.texts[2 * k + 1]
        assert len(chosen) == max(lengths) and len(rejected) == min(lengths)
        assert scored.scores["pair_weight"][2 * k].item() == float(max(lengths) > min(lengths))
    assert scored.scores["chosen"].tolist() == [1.0, 0.0] * 3
    trainer.train()
    logged = trainer.state.log_history[0]
    missing = [m for m in TRL_METRICS if m not in logged]
    assert not missing, missing
    assert math.isfinite(logged["loss"]) and logged["beta"] == pytest.approx(0.1)


def test_policy_loss_is_online_dpo_loss_over_decided_pairs():
    model, tok = build_tiny("nano")
    trainer = OnlineDPOTrainer(model, reward_funcs=text_length, args=short_config(OnlineDPOConfig, beta=0.5),
                               train_dataset=prompts(), processing_class=tok)
    # rows: pair 7 = (rejected, chosen) in that order, pair 3 = a tie; the split may put chosen second
    batch, logps, mask = paired_batch(
        [[-1.0, -2.0], [-0.5, -0.5], [-1.0, -1.0], [-3.0, -1.0]],
        [[-1.5, -1.5], [-1.0, -1.0], [-2.0, -1.0], [-1.0, -1.0]],
        [7, 7, 3, 3], chosen=[0.0, 1.0, 1.0, 0.0], pair_weight=[1.0, 1.0, 0.0, 0.0])
    loss, metrics = trainer.policy_loss(logps, batch, mask)
    expected, _ = online_dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                                  torch.tensor([-3.0]), beta=0.5)
    assert loss.item() == pytest.approx(expected.item())  # the tie contributes nothing
    assert metrics["logps/chosen"] == pytest.approx((-1.0 + -2.0) / 2)
    trainer.args.loss_type = "ipo"
    ipo, _ = trainer.policy_loss(logps, batch, mask)
    assert ipo.item() == pytest.approx((((-1.0 + 2.0) - (-3.0 + 3.0)) - 1 / (2 * 0.5)) ** 2)


def test_beta_per_epoch_list_and_missing_eos_penalty():
    model, tok = build_tiny("nano")
    args = short_config(OnlineDPOConfig, beta=[0.1, 0.5], num_train_epochs=2, max_steps=-1, missing_eos_penalty=1.5)
    assert args.beta == [0.1, 0.5] and short_config(OnlineDPOConfig, beta=[0.3]).beta == 0.3
    trainer = OnlineDPOTrainer(model, reward_funcs=text_length, args=args, train_dataset=prompts(8), processing_class=tok)
    trainer.train()
    betas = history(trainer, "beta")
    assert betas[0] == pytest.approx(0.1) and betas[-1] == pytest.approx(0.5), betas
    rows = [trainer.train_dataset[0]]
    rollout = trainer.rollout(rows, "train")
    scored = super(OnlineDPOTrainer, trainer).score(rows, rollout, "train")
    truncated = torch.tensor(rollout.truncated, dtype=torch.float32)
    assert trainer.scored_rewards(scored).tolist() == pytest.approx((scored.rewards.total - 1.5 * truncated).tolist())


def test_pairs_never_split_and_reference_from_disabled_adapters():
    from peft import LoraConfig

    model, tok = build_tiny("nano")
    with pytest.raises(ValueError, match="split over micro-batches"):
        short_config(OnlineDPOConfig, per_device_train_batch_size=2, gradient_accumulation_steps=2, num_generations=4)
    # 4 micro-batches of one pair each: policy_loss raises on a group that is not a whole pair
    args = short_config(OnlineDPOConfig, per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=1)
    trainer = OnlineDPOTrainer(model, reward_funcs=text_length, args=args, train_dataset=prompts(), processing_class=tok,
                               peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert trainer.ref_model is None  # the reference is the base with adapters disabled
    trainer.train()
    assert history(trainer, "objective/kl")[0] == pytest.approx(0.0, abs=1e-4)  # LoRA starts as the identity


def test_explicit_ref_model_and_rule_judge():
    model, tok = build_tiny("nano", seed=0)
    ref, _ = build_tiny("nano", seed=1)
    judge = RewardFunctionJudge(text_length)
    trainer = OnlineDPOTrainer(model, ref, judge=judge, args=short_config(OnlineDPOConfig, max_steps=1),
                               train_dataset=prompts(), processing_class=tok)
    assert trainer.ref_model is ref
    trainer.train()
    assert abs(history(trainer, "objective/kl")[0]) > 0.05  # another model: a copy of the policy would give 0 here


def test_bad_input_errors():
    model, tok = build_tiny("nano")
    data = prompts(8)
    with pytest.raises(ValueError, match="needs a judge"):
        OnlineDPOTrainer(model, args=short_config(OnlineDPOConfig), train_dataset=data, processing_class=tok)
    with pytest.raises(ValueError, match="not both"):
        OnlineDPOTrainer(model, reward_funcs=text_length, judge=RewardFunctionJudge(text_length),
                         args=short_config(OnlineDPOConfig), train_dataset=data, processing_class=tok)
    with pytest.raises(TypeError, match="judge"):
        OnlineDPOTrainer(model, judge=text_length, args=short_config(OnlineDPOConfig), train_dataset=data,
                         processing_class=tok)
    with pytest.raises(ValueError, match="beta"):
        short_config(OnlineDPOConfig, beta=[])
    with pytest.raises(ValueError, match="loss_type"):
        short_config(OnlineDPOConfig, loss_type="hinge")
    with pytest.raises(ValueError, match="num_generations"):
        short_config(OnlineDPOConfig, num_generations=1)
    assert short_config(OnlineDPOConfig, max_new_tokens=5).max_completion_length == 5
