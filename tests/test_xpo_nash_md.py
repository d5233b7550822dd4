"""XPO and Nash-MD: pairs of (policy, reference / mixture) samples, the losses wired to `xpo_loss` /
`nash_md_loss`, per-epoch alpha / mixture_coef, the seeds' TRL snippets with only the import changed, the CLI."""

from __future__ import annotations

import pytest
import torch

from posttrain import NashMDConfig, NashMDTrainer, RewardFunctionJudge, XPOConfig, XPOTrainer
from posttrain.losses.online_preference import nash_md_loss, xpo_loss
from posttrain.models import build_tiny

from _online_helpers import _one_thread, history, text_length  # noqa: F401  (_one_thread: autouse)
from _online_pref_helpers import paired_batch, prompts, short_config


def test_xpo_pairs_policy_with_reference_sample_and_loss():
    model, tok = build_tiny("nano", seed=0)
    ref, _ = build_tiny("nano", seed=1)
    args = short_config(XPOConfig, alpha=[0.01, 0.02], beta=0.5, max_steps=1)
    trainer = XPOTrainer(model, ref, reward_funcs=text_length, args=args, train_dataset=prompts(), processing_class=tok)
    rows = [trainer.train_dataset[i] for i in range(3)]
    params = trainer.sampling_params("train", 0)
    rollout = trainer.rollout(rows, "train", params)
    assert rollout.prompt_index == [0, 0, 1, 1, 2, 2]
    # the second of each pair is the reference model's own sample (same seed, same engine path)
    again = trainer.second_engine(1.0).generate([r["prompt_ids"] for r in rows],
                                                type(params)(**{**params.to_dict(), "n": 1, "seed": params.seed + 7919}))
    assert rollout.completion_ids[1::2] == again.completion_ids
    scored = trainer.score(rows, rollout, "train")
    lengths = [len(t) for t in rollout.texts]
    wins = [float(lengths[2 * k] > lengths[2 * k + 1]) for k in range(3)]
    assert scored.scores["chosen"].tolist()[0::2] == wins
    # the loss on a batch whose reference sample is chosen in one pair and rejected in the other
    batch, logps, mask = paired_batch([[-1.0, -1.0], [-2.0, -0.5], [-0.5, -0.5], [-3.0, -1.0]],
                                      [[-1.5, -1.0], [-1.0, -1.0], [-1.0, -1.0], [-2.0, -2.0]], [0, 0, 1, 1],
                                      from_policy=[1.0, 0.0, 0.0, 1.0], chosen=[0.0, 1.0, 1.0, 0.0],
                                      pair_weight=[1.0] * 4)
    loss, metrics = trainer.policy_loss(logps, batch, mask)
    s = lambda rows: torch.tensor([sum(r) for r in rows])  # noqa: E731
    expected, _ = xpo_loss(s([[-2.0, -0.5], [-0.5, -0.5]]), s([[-1.0, -1.0], [-3.0, -1.0]]),
                           s([[-1.0, -1.0], [-1.0, -1.0]]), s([[-1.5, -1.0], [-2.0, -2.0]]),
                           s([[-2.0, -0.5], [-0.5, -0.5]]), beta=0.5, alpha=0.01)
    assert loss.item() == pytest.approx(expected.mean().item())
    assert metrics["alpha"] == 0.01 and "loss/xpo" in metrics and "loss/dpo" in metrics
    trainer.train()
    for name in ("loss/dpo", "loss/xpo", "objective/kl", "objective/entropy", "rewards/chosen", "rewards/margins",
                 "logps/chosen", "val/model_contain_eos_token", "val/ref_contain_eos_token", "alpha", "beta"):
        assert name in trainer.state.log_history[0], name


def test_nash_md_preference_from_rewards_and_loss():
    model, tok = build_tiny("nano", seed=0)
    args = short_config(NashMDConfig, mixture_coef=[0.25, 0.75], beta=0.2, max_steps=1)
    trainer = NashMDTrainer(model, reward_funcs=text_length, args=args, train_dataset=prompts(), processing_class=tok)
    assert trainer.coefficient("mixture_coef") == 0.25
    rows = [trainer.train_dataset[i] for i in range(4)]
    rollout = trainer.rollout(rows, "train")
    scored = trainer.score(rows, rollout, "train")
    assert len(scored) == 4 and scored.rollout.completion_ids == rollout.completion_ids[0::2]  # policy samples only
    diff = torch.tensor([(len(rollout.texts[2 * k]) - len(rollout.texts[2 * k + 1])) / 10 for k in range(4)])
    assert scored.scores["probability"].tolist() == pytest.approx(torch.sigmoid(diff).tolist(), abs=1e-5)
    batch, logps, mask = paired_batch([[-1.0, -2.0], [-0.5, -0.1]], [[-1.2, -1.0], [-0.4, -0.3]], [0, 1],
                                      probability=[0.8, 0.3])
    loss, metrics = trainer.policy_loss(logps, batch, mask)
    expected, _ = nash_md_loss(logps, batch.ref_logps, mask, torch.tensor([0.8, 0.3]), beta=0.2)
    assert loss.item() == pytest.approx(expected.mean().item()) and metrics["mixture_coef"] == 0.25
    trainer.train()
    for name in ("loss/kl", "loss/score", "rewards/probabilities", "rewards/win_rate", "objective/kl",
                 "objective/entropy", "val/model_contain_eos_token", "val/ref_contain_eos_token", "beta", "mixture_coef"):
        assert name in trainer.state.log_history[0], name


def test_config_checks():
    with pytest.raises(ValueError, match="num_generations=2"):
        short_config(XPOConfig, num_generations=4)
    with pytest.raises(ValueError, match="mixture_coef"):
        short_config(NashMDConfig, mixture_coef=1.5)
    with pytest.raises(ValueError, match="ipo"):
        short_config(NashMDConfig, loss_type="ipo")
    assert short_config(XPOConfig, alpha=[1e-4]).alpha == 1e-4


def test_seed_snippets_run_with_the_import_changed(tmp_path):
    """The seeds' TRL snippets (trl.experimental.nash_md / xpo), with `from posttrain import ...` and a local
    judge in place of PairRMJudge()."""
    from posttrain import NashMDConfig, NashMDTrainer, XPOConfig, XPOTrainer  # noqa: F811  (the changed import)

    model, tokenizer = build_tiny("nano")
    dataset = prompts(16)
    judge = RewardFunctionJudge(text_length)  # instead of PairRMJudge(), which needs the hub
    trainer = NashMDTrainer(
        model=model,
        judge=judge,
        args=NashMDConfig(output_dir=str(tmp_path / "nash"), max_steps=1, report_to="none", max_new_tokens=4,
                          per_device_train_batch_size=4),
        processing_class=tokenizer,
        train_dataset=dataset,
    )
    trainer.train()
    training_args = XPOConfig(
        alpha=1e-5,  # exploration bonus weight
        beta=0.1,    # KL regularization coefficient
        output_dir=str(tmp_path / "xpo"), max_steps=1, report_to="none", max_new_tokens=4, per_device_train_batch_size=4,
    )
    xpo = XPOTrainer(model=model, judge=judge, args=training_args, processing_class=tokenizer, train_dataset=dataset)
    xpo.train()
    assert xpo.state.global_step == 1 and history(xpo, "alpha") == [1e-5]


@pytest.mark.parametrize("method", ["online_dpo", pytest.param("xpo", marks=pytest.mark.slow),
                                    pytest.param("nash_md", marks=pytest.mark.slow)])
def test_cli_runs_each_method(tmp_path, method):
    from posttrain.cli import parse_method_args, run_method

    _, rewards, judging, config = parse_method_args(method, ["--judge", "rule:arithmetic_steps", "--beta", "0.1", "0.2"])
    assert judging.judge == "rule:arithmetic_steps" and config.beta == [0.1, 0.2]
    metrics = run_method(method, ["--model_name_or_path", "tiny:nano", "--output_dir", str(tmp_path), "--max_steps", "1",
                                  "--max_new_tokens", "4", "--per_device_train_batch_size", "4", "--report_to", "none",
                                  "--judge", "rule:arithmetic_steps", "--save_strategy", "no"])
    assert "train_loss" in metrics
