"""Where the README first pointed: `posttrain.online.reward_model.RewardModelScorer`. The reward model
scorer lives in `posttrain.online.rewards.reward_model`; this name keeps old imports working."""

from ..rewards.reward_model import RewardModelScorer, score_outcomes, score_steps, score_steps_batch

__all__ = ["RewardModelScorer", "score_outcomes", "score_steps", "score_steps_batch"]
