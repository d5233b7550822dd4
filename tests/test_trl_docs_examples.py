"""TRL 1.16's documented quickstart examples (SFT, DPO, reward, KTO, GRPO, RLOO), with the import changed to
posttrain, the hub model replaced by the local ``tiny:nano`` and the hub dataset by a few local rows of the same
shape; runs are cut to one or two steps (``max_steps``), the only other change."""

from __future__ import annotations

import pytest
from datasets import Dataset

pytestmark = pytest.mark.slow

MODEL = "tiny:nano"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write their output folder in the working directory


def _conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": str(2 * i)}]


def _preference(n: int = 8) -> Dataset:  # trl-lib/ultrafeedback_binarized's shape: conversational chosen/rejected
    return Dataset.from_list([{"chosen": _conversation(i), "rejected": _conversation(i)[:1] + [
        {"role": "assistant", "content": "no idea"}]} for i in range(n)])


def _trained(trainer) -> None:
    trainer.train()
    assert trainer.state.global_step >= 1
    assert all(v == v for h in trainer.state.log_history for k, v in h.items() if k == "loss")  # no NaN


def test_sft_quickstart() -> None:
    from posttrain import SFTConfig, SFTTrainer  # was: from trl import SFTTrainer

    dataset = Dataset.from_list([{"messages": _conversation(i)} for i in range(8)])  # trl-lib/Capybara's shape
    trainer = SFTTrainer(model=MODEL, train_dataset=dataset, args=SFTConfig(max_steps=1, report_to="none"))
    _trained(trainer)


def test_dpo_quickstart() -> None:
    from posttrain import DPOConfig, DPOTrainer  # was: from trl import DPOTrainer

    trainer = DPOTrainer(model=MODEL, train_dataset=_preference(), args=DPOConfig(max_steps=1, report_to="none"))
    _trained(trainer)


def test_dpo_with_model_and_tokenizer_loaded_first() -> None:
    """The older form of the docs' DPO example, still common in users' scripts."""
    from posttrain import DPOConfig, DPOTrainer
    from posttrain.models import load_model, load_tokenizer

    model = load_model(MODEL)  # was: AutoModelForCausalLM.from_pretrained("Qwen/Qwen2-0.5B-Instruct")
    tokenizer = load_tokenizer(MODEL)  # was: AutoTokenizer.from_pretrained("Qwen/Qwen2-0.5B-Instruct")
    training_args = DPOConfig(output_dir="Qwen2-0.5B-DPO", max_steps=1, report_to="none")
    trainer = DPOTrainer(model=model, args=training_args, processing_class=tokenizer, train_dataset=_preference())
    _trained(trainer)


def test_reward_quickstart() -> None:
    from posttrain import RewardConfig, RewardTrainer  # was: from trl import RewardTrainer

    trainer = RewardTrainer(model=MODEL, train_dataset=_preference(), args=RewardConfig(max_steps=1, report_to="none"))
    _trained(trainer)


def test_kto_quickstart() -> None:
    from posttrain import KTOConfig, KTOTrainer  # was: from trl import KTOConfig, KTOTrainer
    from posttrain.models import load_model, load_tokenizer

    model = load_model(MODEL)
    tokenizer = load_tokenizer(MODEL)
    rows = [{"prompt": _conversation(i)[:1], "completion": _conversation(i)[1:], "label": i % 2 == 0}
            for i in range(8)]  # trl-lib/kto-mix-14k's shape
    training_args = KTOConfig(output_dir="Qwen2-0.5B-KTO", max_steps=1, report_to="none")
    trainer = KTOTrainer(model=model, args=training_args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(rows))
    _trained(trainer)


def reward_num_unique_letters(completions, **kwargs):
    """An earlier version of the docs' toy reward: the number of distinct characters of each completion."""
    completion_contents = [completion[0]["content"] for completion in completions]
    return [float(len(set(content))) for content in completion_contents]


def _prompts(n: int = 8) -> Dataset:  # trl-lib/DeepMath-103K's shape: conversational prompts and a solution
    return Dataset.from_list([{"prompt": _conversation(i)[:1], "solution": f"${2 * i}$"} for i in range(n)])


@pytest.mark.parametrize("method", ["GRPO", "RLOO"])
def test_online_quickstart(method: str) -> None:
    """The docs' train_grpo.py / train_rloo.py: `from trl.rewards import accuracy_reward` -> posttrain.rewards."""
    pytest.importorskip("math_verify")
    import posttrain  # was: from trl import GRPOTrainer / RLOOTrainer
    from posttrain.rewards import accuracy_reward  # was: from trl.rewards import accuracy_reward

    trainer_cls, config_cls = getattr(posttrain, f"{method}Trainer"), getattr(posttrain, f"{method}Config")
    args = config_cls(max_steps=1, max_completion_length=8, report_to="none")
    trainer = trainer_cls(model=MODEL, reward_funcs=accuracy_reward, train_dataset=_prompts(), args=args)
    _trained(trainer)
    assert any("rewards/accuracy_reward/mean" in h for h in trainer.state.log_history)


@pytest.mark.parametrize("method", ["GRPO", "RLOO"])
def test_online_with_a_custom_reward_function(method: str) -> None:
    import posttrain

    trainer_cls, config_cls = getattr(posttrain, f"{method}Trainer"), getattr(posttrain, f"{method}Config")
    args = config_cls(max_steps=1, max_completion_length=8, report_to="none")
    trainer = trainer_cls(model=MODEL, reward_funcs=reward_num_unique_letters, train_dataset=_prompts(), args=args)
    _trained(trainer)
