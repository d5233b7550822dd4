"""Rewards for the online methods, in one package: reward functions, their composition, and reward models
as reward functions.

- `compose`: the reward contract, resolving a spec (callable, built-in name, import path, model) into a
  function (`resolve_reward_func`), and `RewardComposer`, which runs several on a batch and weights them
  into a `RewardBatch`; failures raise `RewardFunctionError` naming the function and the sample.
- `builtin`: the generic built-in rewards (`accuracy`, `format`, `length`, `soft_overlong`); task rewards
  (`arithmetic`, ...) live with their task in `posttrain.tasks` and resolve by name the same way.
- `inputs`: how a reward model sees (prompt, completion): one encoding for training and scoring.
- `reward_model`: `RewardModelScorer`, a trained outcome or process reward model as a batched function.
- `scoring`: turns a model object, a model folder or a scorer object into a reward function.
"""

from .compose import RewardBatch, RewardComposer, RewardFunc, RewardFunctionError, reward_func_name, resolve_reward_func
from .reward_model import RewardModelScorer, score_outcomes, score_steps, score_steps_batch

__all__ = ["RewardBatch", "RewardComposer", "RewardFunc", "RewardFunctionError", "RewardModelScorer",
           "resolve_reward_func", "reward_func_name", "score_outcomes", "score_steps", "score_steps_batch"]
