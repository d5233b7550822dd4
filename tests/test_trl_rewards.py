"""`posttrain.rewards`: TRL 1.16's reward functions under their names, called as TRL's docs call them (the
expected values are the docs' own examples)."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("math_verify")

from posttrain.rewards import (accuracy_reward, get_cosine_scaled_reward, get_repetition_penalty_reward,  # noqa: E402
                               get_soft_overlong_punishment, reasoning_accuracy_reward, think_format_reward)


def test_accuracy_and_reasoning_accuracy_as_trl_documents_them():
    solutions = [r"\frac{1}{3}", r"\frac{1}{3}"]
    completions = [[{"role": "assistant", "content": r"My answer is \boxed{\frac{1}{3}}"}],
                   [{"role": "assistant", "content": r"My answer is \boxed{\frac{1}{2}}"}]]
    assert accuracy_reward(completions, solutions) == [1.0, 0.0]
    texts = [r"<think> Reasoning content </think> The final answer is \boxed{\frac{1}{3}}",
             r"<think> Reasoning content </think> The final answer is \boxed{\frac{1}{2}}",
             r"<think> Reasoning content with partial answers \boxed{\frac{1}{3}} but no final answer"]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    assert reasoning_accuracy_reward(completions, [r"\frac{1}{3}"] * 3, reasoning_delimiters=["</think>"]) == \
        [1.0, 0.0, 0.0]


def test_think_format_and_soft_overlong():
    assert think_format_reward([[{"content": "<think>\nThis is my reasoning.\n</think>\nThis is my answer."}],
                                [{"content": "<think>\nThis is my reasoning.\nThis is my answer."}]]) == [1.0, 0.0]
    punish = get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    assert punish([[1] * 90]) == [-0.5]
    assert punish([[1] * 70, [1] * 120]) == [0.0, -1.0]


def test_cosine_scaled_reward_follows_its_schedule():
    reward = get_cosine_scaled_reward(max_len=100)
    completions = [[{"content": r"\boxed{\frac{1}{3}}"}], [{"content": r"\boxed{\frac{1}{2}}"}]]
    assert reward(completions, [r"\frac{1}{3}"] * 2, [[1] * 50, [1] * 50]) == pytest.approx([0.75, -0.75])
    # right and short: the top of the correct range; right and over max_len: capped at the long end, not climbing
    assert reward(completions[:1], [r"\frac{1}{3}"], [[1] * 0]) == pytest.approx([1.0])
    assert reward(completions[:1], [r"\frac{1}{3}"], [[1] * 300]) == pytest.approx([0.5])
    # wrong: a short wrong answer is penalized more than a long one
    assert reward(completions[1:], [r"\frac{1}{3}"], [[1] * 10])[0] < reward(completions[1:], [r"\frac{1}{3}"],
                                                                          [[1] * 90])[0]
    expected = -0.5 + 0.5 * (-1.0 + 0.5) * (1 + math.cos(math.pi * 0.1))
    assert reward(completions[1:], [r"\frac{1}{3}"], [[1] * 10]) == pytest.approx([expected])


def test_repetition_penalty():
    penalty = get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0)
    assert penalty([[1, 2, 3, 4], [5, 5, 5, 5, 5]]) == pytest.approx([0.0, -0.75])
    assert penalty([[1]]) == [0.0]
    with pytest.raises(ValueError, match="must not be positive"):
        get_repetition_penalty_reward(max_penalty=0.5)


def test_the_built_in_names_resolve_for_yaml_users():
    from posttrain.online.rewards import resolve_reward_func

    cosine = resolve_reward_func("cosine_scaled", max_completion_length=100)
    assert cosine([None], [r"\boxed{2}"], [[1] * 50], solution=["2"]) == pytest.approx([0.75])
    rep = resolve_reward_func({"name": "repetition_penalty", "ngram_size": 2})
    assert rep([None], ["x"], [[5, 5, 5, 5, 5]]) == pytest.approx([-0.75])
