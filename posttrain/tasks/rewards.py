"""The built-in tasks' reward functions under the names a config uses (``arithmetic``, ``arithmetic_format``,
``arithmetic_steps``), next to the task they check.

Each follows the online reward contract ``f(prompts, completions, completion_ids, **columns) ->
list[float | None]``; `TASK_REWARDS` maps a name to a factory, and `posttrain.online.rewards` resolves these
names as it does its generic built-ins, so ``reward_funcs=["arithmetic"]`` works anywhere.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

from ..data.messages import completion_text
from .arithmetic import Problem, accuracy_reward, format_reward, solve

__all__ = ["TASK_REWARDS", "make_arithmetic_format_reward", "make_arithmetic_reward", "make_arithmetic_steps_reward"]


def make_arithmetic_reward() -> Callable:
    """The built-in arithmetic task's reward (`posttrain.tasks.accuracy_reward`): 1.0 when the integer in
    the completion's ``<answer>`` tags equals the ``answer`` column, else 0.0."""

    def arithmetic(prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                   **kwargs: Any) -> list[float | None]:
        return accuracy_reward(prompts, completions, **kwargs)

    return arithmetic


def make_arithmetic_format_reward() -> Callable:
    """The arithmetic task's format reward (`posttrain.tasks.format_reward`): 1.0 for column steps then
    exactly one ``<answer>integer</answer>``, else 0.0."""

    def arithmetic_format(prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                          **kwargs: Any) -> list[float | None]:
        return format_reward(prompts, completions, **kwargs)

    return arithmetic_format


_QUESTION = re.compile(r"What is (\d+) ([+-]) (\d+)\?")


def make_arithmetic_steps_reward() -> Callable:
    """Partial credit on the arithmetic task: the share of the reference solution's steps (column steps
    and the ``<answer>`` step) that the completion states, in order, exactly.

    The problem is read from the prompt (``What is A + B?``); the reference steps come from
    `posttrain.tasks.solve`. Dense where exact-match accuracy is sparse, so RL from a weak SFT model
    still gets a signal. ``None`` for a prompt that is not an arithmetic question.
    """

    def arithmetic_steps(prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                         **kwargs: Any) -> list[float | None]:
        out: list[float | None] = []
        for prompt, completion in zip(prompts, completions):
            match = _QUESTION.search(completion_text(prompt) if not isinstance(prompt, str) else prompt)
            if match is None:
                out.append(None)
                continue
            reference = solve(Problem(int(match[1]), int(match[3]), match[2])).steps
            stated = re.split(r"(?<=\.)\s+|\s+(?=<answer>)", completion_text(completion).strip())
            hits = sum(1 for k, step in enumerate(reference) if k < len(stated) and stated[k].strip() == step)
            out.append(hits / len(reference))
        return out

    return arithmetic_steps


#: Reward names of the built-in tasks -> factories (no arguments).
TASK_REWARDS: dict[str, Callable[..., Callable]] = {
    "arithmetic": make_arithmetic_reward,
    "arithmetic_format": make_arithmetic_format_reward,
    "arithmetic_steps": make_arithmetic_steps_reward,
}
