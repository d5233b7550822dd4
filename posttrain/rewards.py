"""TRL's reward functions under TRL's names and call signatures: ``from trl.rewards import accuracy_reward``
becomes ``from posttrain.rewards import accuracy_reward``.

Each is the posttrain built-in that computes the same reward (`posttrain.online.rewards.builtin`), called the
way TRL's is: ``accuracy_reward(completions, solution)``, ``get_repetition_penalty_reward(3)(completion_ids)``,
and so on; the trainers call them with keywords, like any reward function. Metrics are logged under TRL's
names (``rewards/accuracy_reward/mean``, ...). The math-verify based ones need ``pip install 'posttrain[math]'``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

from .online.rewards.builtin import (make_accuracy_reward, make_cosine_scaled_reward, make_repetition_penalty_reward,
                                     make_soft_overlong_reward, make_think_format_reward)

__all__ = ["accuracy_reward", "reasoning_accuracy_reward", "think_format_reward", "get_soft_overlong_punishment",
           "get_cosine_scaled_reward", "get_repetition_penalty_reward"]


@functools.lru_cache(maxsize=1)
def _latex_accuracy() -> Callable:
    return make_accuracy_reward(answer_tag=None, latex_only=True)  # TRL's reading: \boxed{} / $...$ via math-verify


def accuracy_reward(completions: Sequence[Any], solution: Sequence[str], log_extra: Callable | None = None,
                    **kwargs: Any) -> list[float | None]:
    """1.0 when math-verify finds the completion's LaTeX answer equal to ``solution``, 0.0 when not, ``None`` (the
    row is skipped) when the gold solution cannot be parsed."""
    return _latex_accuracy()([None] * len(completions), completions, solution=solution)


def reasoning_accuracy_reward(completions: Sequence[Any], solution: Sequence[str],
                              reasoning_delimiters: Sequence[str] | None = None, log_extra: Callable | None = None,
                              **kwargs: Any) -> list[float | None]:
    """`accuracy_reward` on the text after the reasoning: after the last occurrence of the first of
    ``reasoning_delimiters`` (default ``["</think>"]``) that the completion contains; 0.0 when it contains none
    (the reasoning never ended)."""
    from .data.messages import completion_text

    delimiters = list(reasoning_delimiters or ["</think>"])
    out: list[float | None] = []
    for completion, gold in zip(completions, solution):
        text = completion_text(completion)
        delim = next((d for d in delimiters if d in text), None)
        if delim is None:
            out.append(0.0)
            continue
        out.extend(_latex_accuracy()([None], [text.split(delim)[-1]], solution=[gold]))
    return out


def think_format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """1.0 when the completion starts with ``<think>``, opens it once and closes it; else 0.0."""
    return make_think_format_reward()([None] * len(completions), completions)


def get_soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int) -> Callable:
    """DAPO's soft overlong punishment (0 up to ``max_completion_len - soft_punish_cache`` tokens, then down to -1
    at ``max_completion_len``, -1 beyond), called as ``f(completion_ids)``."""
    inner = make_soft_overlong_reward(max_completion_len, soft_punish_cache)

    def soft_overlong_punishment_reward(completion_ids: Sequence[Sequence[int]], **kwargs: Any) -> list[float]:
        return inner(None, None, completion_ids)

    return soft_overlong_punishment_reward


def get_cosine_scaled_reward(max_len: int, min_value_wrong: float = -1.0, max_value_wrong: float = -0.5,
                             min_value_correct: float = 0.5, max_value_correct: float = 1.0) -> Callable:
    """Correctness (as `accuracy_reward`) scaled by the completion's token count on a cosine schedule, called as
    ``f(completions, solution, completion_ids)``."""
    inner = make_cosine_scaled_reward(max_len, min_value_wrong, max_value_wrong, min_value_correct,
                                      max_value_correct, accuracy=lambda p, c, ids, **kw: accuracy_reward(c, **kw))

    def cosine_scaled_reward(completions: Sequence[Any], solution: Sequence[str],
                             completion_ids: Sequence[Sequence[int]], **kwargs: Any) -> list[float | None]:
        return inner([None] * len(completions), completions, completion_ids, solution=solution)

    return cosine_scaled_reward


def get_repetition_penalty_reward(ngram_size: int = 3, max_penalty: float = -1.0) -> Callable:
    """``(1 - unique / total n-grams of token ids) * max_penalty``, called as ``f(completion_ids)``."""
    inner = make_repetition_penalty_reward(ngram_size, max_penalty)

    def repetition_penalty_reward(completion_ids: Sequence[Sequence[int]], **kwargs: Any) -> list[float | None]:
        return inner(None, None, completion_ids)

    return repetition_penalty_reward
