"""REINFORCE++ (Hu et al. 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language
Models"): PPO's clipped update and per-token KL-shaped reward without a critic.

Each token's advantage is its return-to-go, normalized over the whole generation batch
(`posttrain.losses.ppo.reinforce_pp_advantages`); ``advantage_estimator="reinforce_pp_baseline"`` first
subtracts each prompt's mean score over its ``num_generations`` completions. The algorithm is
`posttrain.trainers.ppo.PPOTrainer`'s with ``advantage_estimator`` set; this module gives it the online
methods' call shape ``ReinforcePPTrainer(model, reward_funcs, args, train_dataset, ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._online_config import RewardFuncArgs, reward_trainer_kwargs
from .ppo import PPOConfig, PPOTrainer
from .registry import register_method

__all__ = ["ReinforcePPConfig", "ReinforcePPTrainer"]


@dataclass
class ReinforcePPConfig(PPOConfig):
    """Configuration of `ReinforcePPTrainer`: `PPOConfig` without a critic by default."""

    advantage_estimator: str = field(default="reinforce_pp", metadata={"help": (
        "reinforce_pp: returns-to-go normalized over the batch; reinforce_pp_baseline: after subtracting each "
        "prompt's mean score (needs num_generations >= 2); gae: PPO with a critic.")})


class ReinforcePPTrainer(PPOTrainer):
    """``ReinforcePPTrainer(model, reward_funcs, args, train_dataset, eval_dataset, processing_class,
    reward_processing_classes, peft_config, callbacks, optimizers, ref_model, reward_model=None, engine=None)``."""

    config_class: ClassVar = ReinforcePPConfig
    _tag_names: ClassVar = ["posttrain", "reinforce_pp"]

    def __init__(self, model: Any, reward_funcs: Any = None, args: ReinforcePPConfig | None = None,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Any = None,
                 reward_processing_classes: Any = None, peft_config: Any = None, callbacks: list | None = None,
                 optimizers: tuple = (None, None), ref_model: Any = None, *, reward_model: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(args, processing_class, model, ref_model, reward_model, train_dataset,
                         eval_dataset=eval_dataset, optimizers=optimizers, callbacks=callbacks,
                         peft_config=peft_config, reward_funcs=reward_funcs,
                         reward_processing_classes=reward_processing_classes, **kwargs)


register_method(
    "reinforce_pp", ReinforcePPConfig, ReinforcePPTrainer,
    help="REINFORCE++: PPO's clipped update without a critic, returns-to-go normalized over the batch "
         "(advantage_estimator=reinforce_pp_baseline: per-prompt mean baseline first).",
    extra_args=(RewardFuncArgs,), trainer_kwargs=reward_trainer_kwargs, task_format="prompt_only",
)
