"""PPO trainer: end to end on a tiny model, TRL's call shape and field names, metrics, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from posttrain import PPOConfig, PPOTrainer
from posttrain.models import build_tiny
from posttrain.models.loading import load_model
from posttrain.tasks import ArithmeticTask

from _online_helpers import _one_thread, digit_share, history, text_length  # noqa: F401  (_one_thread: autouse)

TRL_METRICS = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
               "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
               "loss/value_avg", "val/clipfrac_avg", "val/ratio", "val/num_eos_tokens", "val/explained_variance")


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, response_length=6,
                num_ppo_epochs=2, max_steps=2, logging_steps=1, report_to="none", learning_rate=1e-3,
                log_completions=False, save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant",
                temperature=1.0)
    base.update(kw)
    return PPOConfig(**base)


def test_config_maps_trl_fields_onto_the_loop(tmp_path):
    args = _config(tmp_path, num_ppo_epochs=3, num_mini_batches=2, gradient_accumulation_steps=2, response_length=9,
                   max_steps=-1, total_episodes=100, cliprange=0.3)
    assert args.num_iterations == 3 and args.steps_per_generation == 4 and args.max_completion_length == 9
    assert args.generation_batch_size == 32 and args.epsilon == 0.3
    # 100 episodes = 4 generations of 32; each: 3 epochs x 2 mini-batches = 6 optimizer steps
    assert args.max_steps == 4 * 6
    with pytest.raises(ValueError, match="kl_estimator"):
        _config(tmp_path, kl_estimator="k2")
    with pytest.raises(ValueError, match="num_generations >= 2"):
        _config(tmp_path, advantage_estimator="reinforce_pp_baseline")


def test_trls_computed_batch_sizes_follow_trls_arithmetic(tmp_path):
    from posttrain.trainers.ppo import ppo_batch_sizes

    # TRL 1.12 PPOTrainer.__init__'s arithmetic written out for per_device 8, gradient accumulation 2, one
    # mini-batch, 4 processes, 100 episodes (our rollout is num_mini_batches optimizer steps long, TRL's one)
    args = _config(tmp_path, gradient_accumulation_steps=2, steps_per_generation=2, num_mini_batches=1,
                   max_steps=-1, total_episodes=100)
    world = 4
    local = 8 * 2
    trl = {"world_size": world, "local_batch_size": local, "micro_batch_size": 8 * world,
           "batch_size": local * world, "mini_batch_size": local * world // 1, "local_mini_batch_size": local // 1,
           "num_total_batches": -(-100 // (local * world))}
    assert ppo_batch_sizes(args, world, dataset_len=None) == trl
    # num_mini_batches=2 (steps_per_generation = 2 * 2): a rollout of 32 completions per process in 2 steps of 16
    args = _config(tmp_path, gradient_accumulation_steps=2, num_mini_batches=2, max_steps=-1, num_train_epochs=3)
    sizes = ppo_batch_sizes(args, 1, dataset_len=64)
    assert sizes["local_batch_size"] == 32 and sizes["local_mini_batch_size"] == 16
    assert sizes["mini_batch_size"] == sizes["batch_size"] // 2 and sizes["num_total_batches"] == 3 * 64 // 32
    model, tok = build_tiny("nano")
    data = ArithmeticTask(digits=2).prompt_only(16)
    trainer = PPOTrainer(args=_config(tmp_path), processing_class=tok, model=model, reward_funcs=digit_share,
                         train_dataset=data)
    a = trainer.args  # filled in: 8 completions per rollout, max_steps=2 with 2 epochs per rollout -> 1 rollout
    assert (a.batch_size, a.local_batch_size, a.mini_batch_size, a.micro_batch_size, a.world_size) == (8, 8, 8, 8, 1)
    assert a.num_total_batches == 1
    PPOTrainer(args=_config(tmp_path, batch_size=8, world_size=1), processing_class=tok, model=model,
               reward_funcs=digit_share, train_dataset=data)  # consistent values are fine
    for wrong in ({"batch_size": 16}, {"world_size": 2}, {"mini_batch_size": 3}):
        with pytest.raises(ValueError, match=f"{next(iter(wrong))}=.* but this run's is"):
            PPOTrainer(args=_config(tmp_path, **wrong), processing_class=tok, model=model, reward_funcs=digit_share,
                       train_dataset=data)


def test_ppo_trains_with_a_rule_reward_and_logs_trls_metrics(tmp_path):
    model, tok = build_tiny("nano")
    before = copy.deepcopy(model.state_dict())
    trainer = PPOTrainer(args=_config(tmp_path), processing_class=tok, model=model, reward_funcs=text_length,
                         train_dataset=ArithmeticTask(digits=2).prompt_only(32))
    value_before = copy.deepcopy(trainer.value_model.state_dict())
    trainer.train()
    logged = {k for h in trainer.state.log_history for k in h}
    assert set(TRL_METRICS) <= logged, set(TRL_METRICS) - logged
    assert trainer.state.global_step == 2
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(value_before[k], v) for k, v in trainer.value_model.state_dict().items())
    # the critic is a separate model: the policy has no value head, the critic no LM head
    assert not any("score" in k for k in model.state_dict())


def test_trl_shaped_call_with_tokenized_prompts_and_seq_cls_models(tmp_path):
    """TRL 1.12's PPOTrainer(args, processing_class, model, ref_model, reward_model, train_dataset, value_model)."""
    from datasets import Dataset

    model, tok = build_tiny("nano")
    ref_model = copy.deepcopy(model)
    reward_model = load_model("tiny:nano", task="seq-cls")
    value_model = load_model("tiny:nano", task="seq-cls")
    prompts = ArithmeticTask(digits=2).prompt_only(16)["prompt"]
    dataset = Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for p in prompts]})
    args = _config(tmp_path, kl_coef=0.1, missing_eos_penalty=1.0, num_ppo_epochs=1)
    trainer = PPOTrainer(args, tok, model, ref_model, reward_model, dataset, value_model)
    assert trainer.value_model is value_model and trainer.ref_model is ref_model
    assert trainer.train_dataset["prompt_ids"] == dataset["input_ids"]  # the given ids are the prompts
    trainer.train()
    kls = history(trainer, "objective/kl")
    assert len(kls) == 2 and abs(kls[0]) < 1e-5 and kls[1] != 0.0
    assert len(history(trainer, "loss/value_avg")) == 2


def test_value_model_on_another_vocabulary_is_refused(tmp_path):
    model, tok = build_tiny("nano")
    small = load_model("tiny:nano", task="seq-cls")
    small.resize_token_embeddings(16)
    small.config.vocab_size = 16
    with pytest.raises(ValueError, match="vocabulary"):
        PPOTrainer(args=_config(tmp_path), processing_class=tok, model=model, reward_funcs=digit_share,
                   train_dataset=ArithmeticTask(digits=2).prompt_only(16), value_model=small)


def test_needs_a_reward(tmp_path):
    model, tok = build_tiny("nano")
    with pytest.raises(ValueError, match="score completions"):
        PPOTrainer(args=_config(tmp_path), processing_class=tok, model=model,
                   train_dataset=ArithmeticTask(digits=2).prompt_only(16))


def test_cli_ppo_with_rule_rewards(tmp_path):
    from posttrain.cli import run_method

    config = tmp_path / "run.yaml"
    config.write_text(
        "model_name_or_path: tiny:nano\ntask_train_size: 16\ndataset_test_split: null\n"
        "reward_funcs: [arithmetic_format, _online_helpers:digit_share]\nper_device_train_batch_size: 4\n"
        "response_length: 4\nmax_steps: 2\nnum_ppo_epochs: 1\nreport_to: none\nsave_strategy: 'no'\n"
        f"log_completions: false\nsave_value_model: true\noutput_dir: {tmp_path / 'out'}\n"
    )
    metrics = run_method("ppo", ["--config", str(config), "--kl_coef", "0.1"])
    assert "train_loss" in metrics
    assert (tmp_path / "out" / "config.json").exists() and (tmp_path / "out" / "value_model" / "config.json").exists()


def _learning_run(tmp_path, **kw):
    data = ArithmeticTask(digits=2).prompt_only(264)
    train, held_out = data.select(range(200)), data.select(range(200, 264))
    model, tok = build_tiny("nano")
    args = _config(tmp_path, per_device_train_batch_size=16, response_length=8, num_ppo_epochs=1, max_steps=16,
                   learning_rate=3e-2, logging_steps=4, kl_coef=0.0, per_device_eval_batch_size=64, **kw)
    trainer = PPOTrainer(args=args, processing_class=tok, model=model, reward_funcs=digit_share,
                         train_dataset=train, eval_dataset=held_out)
    before = trainer.evaluate()["eval_reward"]
    trainer.train()
    return trainer, before, trainer.evaluate()["eval_reward"]


@pytest.mark.slow
def test_ppo_raises_held_out_reward():
    """PPO with its critic (GAE) on a rule reward: the mean reward on 64 held-out prompts rises (measured
    0.00 -> 1.00 in 16 steps of 16 completions)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        from pathlib import Path
        trainer, before, after = _learning_run(Path(tmp), value_learning_rate=1e-4, seed=0)
    print(f"PPO held-out reward {before:.3f} -> {after:.3f}", history(trainer, "objective/scores"))
    assert before < 0.1 and after > 0.5
    assert len(history(trainer, "loss/value_avg")) == 4


def test_peft_reference_is_the_base_with_adapters_disabled(tmp_path):
    from peft import LoraConfig

    model, tok = build_tiny("nano")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = _config(tmp_path, kl_coef=0.1, num_ppo_epochs=1, learning_rate=5e-2)
    # TRL's call with a ref_model and a peft_config: the base serves as the reference, no copy is kept
    trainer = PPOTrainer(args, tok, model, copy.deepcopy(model), None, ArithmeticTask(digits=2).prompt_only(16),
                         None, peft_config=lora, reward_funcs=text_length)
    assert trainer.ref_model is None
    causal_lms = [m for m in (trainer.model, trainer.value_model) for m in m.modules()
                  if type(m).__name__ == "LlamaForCausalLM"]
    assert len(causal_lms) == 1  # the policy; the critic is a seq-cls model built from the plain weights
    assert not any("lora" in k for k in trainer.value_model.state_dict())
    trainer.train()
    kls = history(trainer, "objective/kl")
    assert abs(kls[0]) < 1e-5 and abs(kls[1]) > 1e-6  # zero-initialized adapters: policy == base at first


def test_resume_restores_policy_value_model_and_optimizer(tmp_path):
    data = ArithmeticTask(digits=2).prompt_only(32)

    def make():
        model, tok = build_tiny("nano")
        args = _config(tmp_path, num_ppo_epochs=1, save_strategy="steps", save_steps=1, max_steps=2)
        return PPOTrainer(args=args, processing_class=tok, model=model, reward_funcs=digit_share, train_dataset=data)

    first = make()
    first.train()  # two steps, checkpoints after each
    second = make()
    second.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    # step 2 from the restored policy, critic and Adam moments gives the uninterrupted run's weights
    assert second.state.global_step == 2
    for a, b in [(first.model, second.model), (first.value_model, second.value_model)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)
    value_a, value_b = next(iter(first.value_model.parameters())), next(iter(second.value_model.parameters()))
    assert torch.allclose(first.optimizer.state[value_a]["exp_avg"], second.optimizer.state[value_b]["exp_avg"], atol=1e-7)
