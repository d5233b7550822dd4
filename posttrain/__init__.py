"""posttrain: post-training for transformer language models (SFT, preference optimization, reward models,
online RL, distillation), native to the Hugging Face stack.

Public names are imported lazily, so `import posttrain` stays cheap and `posttrain --help` is quick.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (one line per name; add yours here)
_EXPORTS: dict[str, str] = {
    "PostTrainConfig": "posttrain.trainers.base",
    "PostTrainer": "posttrain.trainers.base",
    "SFTConfig": "posttrain.trainers.sft",
    "SFTTrainer": "posttrain.trainers.sft",
    "RewardConfig": "posttrain.trainers.reward",
    "RewardTrainer": "posttrain.trainers.reward",
    "PRMConfig": "posttrain.trainers.prm",
    "PRMTrainer": "posttrain.trainers.prm",
    "GRPOConfig": "posttrain.trainers.grpo",
    "GRPOTrainer": "posttrain.trainers.grpo",
    "AsyncGRPOConfig": "posttrain.trainers.async_grpo",
    "AsyncGRPOTrainer": "posttrain.trainers.async_grpo",
    "RLOOConfig": "posttrain.trainers.rloo",
    "RLOOTrainer": "posttrain.trainers.rloo",
    "PPOConfig": "posttrain.trainers.ppo",
    "PPOTrainer": "posttrain.trainers.ppo",
    "ReinforcePPConfig": "posttrain.trainers.reinforce_pp",
    "ReinforcePPTrainer": "posttrain.trainers.reinforce_pp",
    "DPOConfig": "posttrain.trainers.dpo",
    "DPOTrainer": "posttrain.trainers.dpo",
    "CPOConfig": "posttrain.trainers.cpo",
    "CPOTrainer": "posttrain.trainers.cpo",
    "ORPOConfig": "posttrain.trainers.orpo",
    "ORPOTrainer": "posttrain.trainers.orpo",
    "KTOConfig": "posttrain.trainers.kto",
    "KTOTrainer": "posttrain.trainers.kto",
    "BCOConfig": "posttrain.trainers.bco",
    "BCOTrainer": "posttrain.trainers.bco",
    "GKDConfig": "posttrain.trainers.gkd",
    "GKDTrainer": "posttrain.trainers.gkd",
    "MiniLLMConfig": "posttrain.trainers.minillm",
    "MiniLLMTrainer": "posttrain.trainers.minillm",
    "DistillationConfig": "posttrain.trainers.distillation",
    "DistillationTrainer": "posttrain.trainers.distillation",
    "OnlineDPOConfig": "posttrain.trainers.online_dpo",
    "OnlineDPOTrainer": "posttrain.trainers.online_dpo",
    "NashMDConfig": "posttrain.trainers.nash_md",
    "NashMDTrainer": "posttrain.trainers.nash_md",
    "XPOConfig": "posttrain.trainers.xpo",
    "XPOTrainer": "posttrain.trainers.xpo",
    "BaseJudge": "posttrain.online.judges",
    "BasePairwiseJudge": "posttrain.online.judges",
    "BaseRankJudge": "posttrain.online.judges",
    "BaseBinaryJudge": "posttrain.online.judges",
    "AllTrueJudge": "posttrain.online.judges",
    "RewardFunctionJudge": "posttrain.online.judges",
    "RewardModelJudge": "posttrain.online.judges",
    "PairRMJudge": "posttrain.online.judges",
    "LLMPairwiseJudge": "posttrain.online.judge_llm",
    "OpenAIPairwiseJudge": "posttrain.online.judge_llm",
    "RewardComposer": "posttrain.online.rewards",
    "RewardFunctionError": "posttrain.online.rewards",
    "DatasetSource": "posttrain.data.mixtures",
    "mix_datasets": "posttrain.data.mixtures",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'posttrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = list(_EXPORTS)
