"""Reward models where a reward function is expected.

A sequence-classification model object, a model folder / hub name / ``tiny:`` spec, a
`posttrain.online.rewards.RewardModelScorer`, or any object with a ``score(prompts, completions)``
method becomes a callable with the reward contract ``f(prompts, completions, completion_ids, **columns)``.
Models are wrapped in `RewardModelScorer`, which encodes inputs exactly as the reward trainers did.
"""

from __future__ import annotations

import inspect
import os
import re
from typing import Any, Sequence

import torch

_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


def looks_like_model(spec: str) -> bool:
    """A ``tiny:`` spec, an existing folder, or an ``org/name`` hub-style name."""
    return spec.startswith("tiny:") or os.path.isdir(os.path.expanduser(spec)) or bool(_HUB_NAME.match(spec))


def is_reward_model(obj: Any) -> bool:
    """A model (``nn.Module`` with a config), or a non-function object with a ``score`` method."""
    if isinstance(obj, torch.nn.Module):
        return hasattr(obj, "config")
    return callable(getattr(obj, "score", None)) and not inspect.isroutine(obj)


class ScorerReward:
    """Adapts an object with ``score(prompts, completions)`` to the reward contract."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer
        self.reward_name = getattr(scorer, "name", None) or type(scorer).__name__

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                 **kwargs: Any) -> list[float]:
        out = self.scorer.score(list(prompts), list(completions))
        return out.tolist() if isinstance(out, torch.Tensor) else list(out)


def model_reward(spec: Any, processing_class: Any = None) -> Any:
    """A reward callable for a model object or path (outcome reward model), or a scorer object.

    ``processing_class`` is the reward model's tokenizer (default: loaded from where the model came from).
    """
    from .reward_model import RewardModelScorer

    if isinstance(spec, RewardModelScorer):
        return spec
    if isinstance(spec, (str, os.PathLike, torch.nn.Module)):
        return RewardModelScorer(spec, tokenizer=processing_class)
    return ScorerReward(spec)
