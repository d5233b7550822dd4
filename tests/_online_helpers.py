"""Shared pieces of the online-RL tests (GRPO, RLOO, engines)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded (and the CI box is shared). Autouse where imported."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def digit_share(prompts, completions, **kwargs):
    """A reward a random tiny model can learn in a few steps: the share of digit characters."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def text_length(prompts, completions, **kwargs):
    """A reward that varies within every group of a random model's samples (their texts' lengths differ),
    for tests that need the policy to move whatever tokens the sampler drew."""
    return [len(c) / 10 for c in completions]


def history(trainer, key: str) -> list:
    """The logged values of ``key``, in order."""
    return [h[key] for h in trainer.state.log_history if key in h]


def scored_with(rewards, num_generations: int):
    """A `ScoredRollout` carrying just ``rewards`` (a tensor [N]; NaN for a completion no function scored), in
    groups of ``num_generations`` completions per prompt, for calling a trainer's `compute_advantages` directly."""
    from posttrain.online.engines import Rollout
    from posttrain.online.pipeline import ScoredRollout
    from posttrain.online.rewards import RewardBatch

    n = len(rewards)
    per_func = rewards.float().view(-1, 1)
    total = per_func.nan_to_num(0.0).flatten()
    prompt_index = [i // num_generations for i in range(n)]
    rollout = Rollout(prompt_index, [[1]] * n, [[2]] * n, ["x"] * n, [[0.0]] * n, [False] * n)
    return ScoredRollout([{"prompt": f"p{k}"} for k in range(n // num_generations)], rollout, ["x"] * n,
                         RewardBatch(["r"], per_func, total, int(per_func.isnan().sum()), [1.0]))
