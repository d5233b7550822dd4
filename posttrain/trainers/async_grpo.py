"""Async GRPO: GRPO with generation running ahead of training in another process (TRL's AsyncGRPOTrainer).

``AsyncGRPOTrainer`` is `GRPOTrainer` with ``async_generation=True``: a producer thread asks a rollout
worker (a `posttrain serve` process the trainer starts on 127.0.0.1, or the one at
``vllm_server_base_url``) for completions, scores them and queues them; the trainer trains on the queue,
drops generations more than ``max_staleness`` optimizer steps old (counted), corrects for the stale
sampler with importance weights (``importance_sampling_mode``: truncated by default, or masked), and
pushes its weights to the worker every ``weight_sync_steps`` steps. The algorithm is GRPO's
(`posttrain.trainers.grpo`); the machinery is `posttrain.trainers._async` and
`posttrain.online.async_rollout`. RLOO takes the same switch (``RLOOConfig(async_generation=True)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ._online_config import RewardArgs, reward_trainer_kwargs
from .grpo import GRPOConfig, GRPOTrainer
from .registry import register_method

__all__ = ["AsyncGRPOConfig", "AsyncGRPOTrainer"]


@dataclass
class AsyncGRPOConfig(GRPOConfig):
    """`GRPOConfig` with ``async_generation=True`` (field names follow TRL 1.16's AsyncGRPOConfig:
    ``max_staleness``, ``queue_maxsize``, ``weight_sync_steps``, ``max_inflight_tasks``,
    ``vllm_server_base_url``; see `posttrain.online.async_rollout.AsyncRolloutArgs`)."""

    async_generation: bool = field(default=True, metadata={"help": (
        "Generate in a rollout worker ahead of training (always on for async_grpo; False runs plain GRPO).")})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps (TRL's AsyncGRPOConfig: 1)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": (
        "Learning-rate schedule (TRL's AsyncGRPOConfig: constant).")})


class AsyncGRPOTrainer(GRPOTrainer):
    """``AsyncGRPOTrainer(model, reward_funcs, args=AsyncGRPOConfig(...), train_dataset, processing_class)``."""

    config_class: ClassVar = AsyncGRPOConfig
    _tag_names: ClassVar = ["posttrain", "grpo", "async-grpo"]


register_method(
    "async_grpo", AsyncGRPOConfig, AsyncGRPOTrainer,
    help="Async GRPO: GRPO with generation in a rollout worker running ahead of training (same as grpo --async).",
    extra_args=(RewardArgs,), trainer_kwargs=reward_trainer_kwargs, task_format="prompt_only",
)
