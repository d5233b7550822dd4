"""What every trainer does with its `args` first (issue 26): a plain `transformers.TrainingArguments` becomes the
method's config (the fields it set carried over, the rest at the method's defaults), and the run is seeded
before the model, its adapters or its heads are built, so LoRA runs at one seed are identical."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import Seq2SeqTrainingArguments, TrainingArguments

from posttrain import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
from posttrain.tasks import ArithmeticTask
from posttrain.trainers import _args
from posttrain.trainers.grpo import GRPOConfig, GRPOTrainer

from _online_helpers import _one_thread, digit_share  # noqa: F401  (_one_thread: autouse)


@pytest.fixture(scope="module")
def task():
    return ArithmeticTask(digits=2)


@pytest.fixture(scope="module")
def sft_rows(task):
    return task.split(0, 16, train_format="prompt_only", test_format="prompt_completion")["test"]


@pytest.fixture(scope="module")
def pairs(task):
    return task.preference(16)


def _lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _short(cls, tmp_path, seed, **kw):
    return cls(output_dir=str(tmp_path / f"out{seed}"), max_steps=3, per_device_train_batch_size=4,
               learning_rate=1e-2, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
               seed=seed, **kw)


def _run(trainer):
    """Train; return the per-step losses and the trained adapter weights."""
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert len(losses) == 3 and adapters
    return losses, adapters


def _same(a, b) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


# ----------------------------------------------------------------------------------------------- seeding
def test_two_sft_lora_runs_at_one_seed_are_identical_and_another_seed_differs(tmp_path, sft_rows):
    def run(seed):
        return _run(SFTTrainer("tiny:nano", args=_short(SFTConfig, tmp_path, seed), train_dataset=sft_rows,
                               peft_config=_lora()))

    first = run(42)
    torch.rand(100)  # whatever ran before in the process must not matter
    again = run(42)
    other = run(43)
    assert _same(first, again)  # before the fix: the same step-1 loss, then different from step 2 on
    assert first[0][1:] != other[0][1:]
    assert not all(torch.equal(first[1][k], other[1][k]) for k in first[1])


def test_two_dpo_lora_runs_at_one_seed_are_identical_and_another_seed_differs(tmp_path, pairs):
    def run(seed):
        return _run(DPOTrainer("tiny:nano", args=_short(DPOConfig, tmp_path, seed,
                                                        ref_logps_cache_dir=str(tmp_path / "cache")),
                               train_dataset=pairs, peft_config=_lora()))

    first = run(42)
    torch.rand(100)
    assert _same(first, run(42))
    other = run(43)
    assert not all(torch.equal(first[1][k], other[1][k]) for k in first[1])


def test_full_determinism_seeds_with_enable_full_determinism(tmp_path, sft_rows, monkeypatch):
    calls = []
    monkeypatch.setattr(_args, "enable_full_determinism", lambda seed: calls.append(seed))  # no global switch
    SFTTrainer("tiny:nano", args=_short(SFTConfig, tmp_path, 5, full_determinism=True), train_dataset=sft_rows)
    assert calls[0] == 5


# ------------------------------------------------------------------------------- TrainingArguments as args
def _plain(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "plain"), max_steps=1, per_device_train_batch_size=4, learning_rate=3e-4,
                seed=7, report_to="none", save_strategy="no", disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def _check_converted(args, cls, tmp_path):
    assert type(args) is cls
    # what the caller set is carried over ...
    assert (args.learning_rate, args.max_steps, args.per_device_train_batch_size, args.seed) == (3e-4, 1, 4, 7)
    assert args.output_dir == str(tmp_path / "plain") and args.save_strategy == "no"
    # ... and what it left alone takes the method's defaults, not TrainingArguments' (500, True)
    assert args.logging_steps == 10 and args.remove_unused_columns is False


def test_sft_converts_plain_training_arguments_and_trains(tmp_path, sft_rows):
    trainer = SFTTrainer("tiny:nano", args=_plain(tmp_path), train_dataset=sft_rows)
    _check_converted(trainer.args, SFTConfig, tmp_path)
    assert trainer.args.max_length == 1024 and trainer.args.padding_free  # SFT's own fields, at their defaults
    assert trainer.train().global_step == 1


def test_dpo_reward_and_grpo_convert_plain_training_arguments(tmp_path, pairs, task):
    dpo = DPOTrainer("tiny:nano", args=_plain(tmp_path), train_dataset=pairs)
    _check_converted(dpo.args, DPOConfig, tmp_path)
    assert dpo.args.beta == 0.1 and dpo.ref_model is not None
    reward = RewardTrainer("tiny:nano", args=_plain(tmp_path), train_dataset=pairs)
    _check_converted(reward.args, RewardConfig, tmp_path)
    assert reward.train().global_step == 1
    grpo = GRPOTrainer("tiny:nano", digit_share, args=_plain(tmp_path, per_device_train_batch_size=8),
                       train_dataset=task.prompt_only(8))
    assert type(grpo.args) is GRPOConfig and grpo.args.learning_rate == 3e-4 and grpo.args.seed == 7
    assert grpo.args.num_generations == 8 and grpo.args.logging_steps == 10


def test_a_set_field_the_method_lacks_is_an_error(tmp_path, sft_rows):
    s2s = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "s2s"), predict_with_generate=True, report_to="none")
    with pytest.raises(ValueError, match="predict_with_generate"):
        SFTTrainer("tiny:nano", args=s2s, train_dataset=sft_rows)
    with pytest.raises(ValueError, match="beta"):  # another method's config: its own fields are not SFT's
        SFTTrainer("tiny:nano", args=DPOConfig(output_dir=str(tmp_path / "d"), beta=0.5), train_dataset=sft_rows)
    with pytest.raises(TypeError, match="TrainingArguments"):
        SFTTrainer("tiny:nano", args={"learning_rate": 1e-3}, train_dataset=sft_rows)
