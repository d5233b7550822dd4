"""Online DPO, XPO and Nash-MD learn (slow): held-out greedy completions of a random tiny model move to what
the judge prefers, with a rule judge and with a reward model trained by `RewardTrainer` as the judge."""

from __future__ import annotations

import random
import time

import pytest
from datasets import Dataset

from posttrain import (NashMDConfig, NashMDTrainer, OnlineDPOConfig, OnlineDPOTrainer, RewardConfig, RewardFunctionJudge,
                       RewardModelJudge, RewardTrainer, XPOConfig, XPOTrainer)
from posttrain.models import build_tiny
from posttrain.tasks import ArithmeticTask
from posttrain.tasks.evaluate import greedy_completions

from _online_helpers import _one_thread, digit_share, history  # noqa: F401  (_one_thread: autouse)
from _online_pref_helpers import short_config

METHODS = {"online_dpo": (OnlineDPOConfig, OnlineDPOTrainer, {"num_generations": 4}),
           "xpo": (XPOConfig, XPOTrainer, {}), "nash_md": (NashMDConfig, NashMDTrainer, {})}


def _held_out_digit_share(model, tok, test) -> float:
    completions = greedy_completions(model, tok, list(test["prompt"]), max_new_tokens=8)
    return sum(digit_share(None, completions)) / len(completions)


def _train(method, judge, steps=16):
    config_cls, trainer_cls, extra = METHODS[method]
    split = ArithmeticTask(digits=2).split(400, 64, "prompt_only", "prompt_only")  # held-out: unseen problems
    model, tok = build_tiny("nano")
    before = _held_out_digit_share(model, tok, split["test"])
    args = short_config(config_cls, per_device_train_batch_size=16, max_new_tokens=8, max_steps=steps,
                        logging_steps=4, temperature=1.0, **extra)
    start = time.perf_counter()
    trainer = trainer_cls(model, judge=judge, args=args, train_dataset=split["train"], processing_class=tok)
    trainer.train()
    after = _held_out_digit_share(model, tok, split["test"])
    print(f"{method} with {type(judge).__name__}: held-out digit share {before:.3f} -> {after:.3f} "
          f"in {time.perf_counter() - start:.1f}s")
    return before, after, trainer


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_rule_judge_moves_held_out_completions(method):
    """Measured on the shared 2-core VM: 0.0 -> 1.0 for all three in 10-13 s of training."""
    before, after, trainer = _train(method, RewardFunctionJudge(digit_share))
    assert before < 0.05 and after > 0.6
    kl = history(trainer, "objective/kl")
    assert kl[-1] > kl[0]  # it moved away from the reference to get there


def _digit_preferences(n: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 12)))
        words = "".join(rng.choice("abcdefghij .,+=") for _ in range(rng.randint(3, 12)))
        rows.append({"prompt": f"What is {a} + {b}?\n", "chosen": digits, "rejected": words})
    return Dataset.from_list(rows)


@pytest.mark.slow
def test_trained_reward_model_as_judge(tmp_path):
    """A tiny reward model trained (RewardTrainer, 60 steps) to prefer digits judges Online DPO's pairs."""
    args = RewardConfig(output_dir=str(tmp_path / "rm"), per_device_train_batch_size=16, learning_rate=1e-3,
                        max_steps=60, save_strategy="no", report_to="none", disable_tqdm=True, seed=0, logging_steps=60)
    rm = RewardTrainer("tiny:nano", args=args, train_dataset=_digit_preferences(960, 0))
    rm.train()
    rm.save_model(str(tmp_path / "rm"))
    rm.tokenizer.save_pretrained(str(tmp_path / "rm"))
    judge = RewardModelJudge(str(tmp_path / "rm"))
    held_out = _digit_preferences(32, 1)
    right = judge.judge(list(held_out["prompt"]), [[c, r] for c, r in zip(held_out["chosen"], held_out["rejected"])],
                        shuffle_order=False)
    assert sum(v == 0 for v in right) >= 28  # the judge itself ranks unseen pairs right
    before, after, _ = _train("online_dpo", judge, steps=40)
    print(f"reward-model judge ranks {sum(v == 0 for v in right)}/32 held-out pairs right")
    assert before < 0.05 and after > 0.5
