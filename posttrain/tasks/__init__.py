"""Built-in verifiable tasks (data + rewards + evaluation) for the quickstart, examples and tests."""

from .arithmetic import (
    ArithmeticTask,
    Problem,
    Solution,
    accuracy_reward,
    check_step,
    extract_answer,
    format_reward,
    solve,
)
from .evaluate import ExactMatchCallback, exact_match, tool_exact_match

__all__ = [
    "ArithmeticTask",
    "ExactMatchCallback",
    "Problem",
    "Solution",
    "accuracy_reward",
    "check_step",
    "exact_match",
    "extract_answer",
    "format_reward",
    "solve",
    "tool_exact_match",
]
