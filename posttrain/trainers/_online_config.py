"""Config fields every online RL method shares (generation, batching, rewards, corrections, logging).

Batch sizes follow TRL's conventions: ``per_device_train_batch_size`` counts *completions* per
micro-batch; one generation produces ``per_device_train_batch_size * steps_per_generation`` completions per
process (``generation_batch_size`` over all processes), i.e. that number divided by ``num_generations``
prompts, each sampled ``num_generations`` times.
"""

from __future__ import annotations

import json

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..online.async_rollout import AsyncRolloutArgs
from ..online.engines import OnlineEngineArgs
from .base import PostTrainConfig

__all__ = ["OnlineConfig"]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class OnlineConfig(OnlineEngineArgs, AsyncRolloutArgs, PostTrainConfig):
    """Shared fields of `GRPOConfig`, `RLOOConfig` and later online methods."""

    # ---- generation
    num_generations: int = field(default=8, metadata=_help("Completions sampled per prompt (the group size)."))
    max_prompt_length: int | None = field(default=None, metadata=_help(
        "None (the default, as TRL): prompts are never cut. A number: prompts longer than this many tokens keep "
        "their last tokens; the trainer warns with the count before training and logs data/truncated_prompts."))
    max_completion_length: int | None = field(default=256, metadata=_help(
        "Most tokens generated per completion. None: up to the model's context length (minus the longest prompt)."))
    temperature: float = field(default=1.0, metadata=_help("Sampling temperature (log-probs use the same)."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling; 1 is off."))
    top_k: int | None = field(default=0, metadata=_help("Top-k sampling; 0 or None is off."))
    min_p: float | None = field(default=0.0, metadata=_help("Min-p sampling; 0 or None is off."))
    repetition_penalty: float = field(default=1.0, metadata=_help("Repetition penalty; 1 is off."))
    generation_batch_size: int | None = field(default=None, metadata=_help(
        "Completions generated at once over all processes. Default: per_device_train_batch_size * "
        "steps_per_generation * processes."))
    steps_per_generation: int | None = field(default=None, metadata=_help(
        "Micro-batches taken from one generation (default: gradient_accumulation_steps). A multiple of "
        "gradient_accumulation_steps: more than it reuses a generation over several optimizer steps."))
    num_iterations: int = field(default=1, metadata=_help(
        "Passes over each generation batch (PPO epochs, 'mu' in the GRPO paper); >1 uses old log-probs."))
    mask_truncated_completions: bool = field(default=False, metadata=_help(
        "Leave completions that hit max_completion_length out of the loss (DAPO)."))
    dynamic_sampling: bool = field(default=False, metadata=_help(
        "DAPO's dynamic sampling: drop the groups whose rewards are all equal (no learning signal) and refill the "
        "generation with new prompts, up to max_resample_rounds rounds (metrics dynamic_sampling/*)."))
    max_resample_rounds: int = field(default=3, metadata=_help(
        "Most refill rounds per generation with dynamic_sampling; then it trains on the groups it has."))
    chat_template_kwargs: dict | str | None = field(default=None, metadata=_help(
        "Extra variables for the chat template when prompts are rendered, e.g. {'enable_thinking': False}."))
    # ---- tools and environments (posttrain.online.multiturn)
    max_tool_calling_iterations: int | None = field(default=None, metadata=_help(
        "Most tool-calling turns per rollout (tools / environment_factory); None: until the model answers or "
        "max_completion_length (generated plus tool-result tokens) is spent."))
    tool_timeout: float | None = field(default=None, metadata=_help(
        "Seconds a tool call may take before it is cut and answered with an error message; None: no limit."))
    # ---- rewards
    reward_weights: list[float] | None = field(default=None, metadata=_help(
        "Weight of each reward function in the total (default: all 1)."))
    # ---- policy loss
    beta: float = field(default=0.0, metadata=_help(
        "KL coefficient to the reference policy; 0 loads no reference model."))
    epsilon: float = field(default=0.2, metadata=_help("Lower clip range of the importance ratio (1 - epsilon)."))
    epsilon_high: float | None = field(default=None, metadata=_help(
        "Upper clip range (1 + epsilon_high), 'clip-higher' of DAPO; default: epsilon."))
    importance_sampling_correction: bool | None = field(default=None, metadata=_help(
        "Correct for sampler/trainer mismatch with truncated importance weights. Default: on when the engine "
        "is not the training model itself (vLLM, rollout server)."))
    importance_sampling_cap: float = field(default=2.0, metadata=_help("Truncation cap of the IS weights."))
    importance_sampling_mode: str = field(default="truncate", metadata=_help(
        "How the IS weights exp(old - sampler) are bounded: 'truncate' caps them at importance_sampling_cap; "
        "'mask' zeroes the tokens whose weight is outside [importance_sampling_low, importance_sampling_high]."))
    importance_sampling_low: float = field(default=0.5, metadata=_help("Lower bound of the weights kept by 'mask'."))
    importance_sampling_high: float | None = field(default=None, metadata=_help(
        "Upper bound of the weights kept by 'mask' (default: importance_sampling_cap)."))
    skip_zero_advantage_backward: bool = field(default=True, metadata=_help(
        "Run the completions whose advantage is exactly 0 without gradients when the loss has no other term "
        "for them (beta=0, or RLOO's KL in the reward): their log-probs still enter the loss and its "
        "metrics, but no activations or backward are spent on them. The loss and gradient are unchanged; a "
        "batch with many zero-variance groups trains much faster. False runs every completion with "
        "gradients."))
    # ---- logging
    log_completions: bool = field(default=True, metadata=_help("Print and report a table of sample completions."))
    log_completions_steps: int = field(default=50, metadata=_help("Log the completions table every N steps."))
    num_completions_to_print: int = field(default=4, metadata=_help("Rows in the completions table."))
    # ---- overridden defaults
    learning_rate: float = field(default=1e-6, metadata=_help("Peak learning rate of AdamW."))
    padding_free: bool = field(default=True, metadata=_help(
        "Score prompt+completion sequences packed in one row (no compute on padding)."))
    per_device_train_batch_size: int = field(default=8, metadata=_help("Completions per micro-batch and device."))

    def __post_init__(self) -> None:
        self.top_k = 0 if self.top_k is None else self.top_k
        self.min_p = 0.0 if self.min_p is None else self.min_p
        if isinstance(self.chat_template_kwargs, str):  # from the command line: JSON
            self.chat_template_kwargs = json.loads(self.chat_template_kwargs)
        super().__post_init__()
        ga = self.gradient_accumulation_steps
        if self.steps_per_generation is None and self.generation_batch_size is not None:
            per_step = self.per_device_train_batch_size * self.world_size
            if self.generation_batch_size % per_step:
                raise ValueError(f"generation_batch_size={self.generation_batch_size} must be a multiple of "
                                 f"per_device_train_batch_size * processes = {per_step}")
            self.steps_per_generation = self.generation_batch_size // per_step
        if self.steps_per_generation is None:
            self.steps_per_generation = ga
        if self.steps_per_generation % ga:
            raise ValueError(f"steps_per_generation={self.steps_per_generation} must be a multiple of "
                             f"gradient_accumulation_steps={ga}")
        per_device = self.per_device_train_batch_size * self.steps_per_generation
        if self.generation_batch_size is None:
            self.generation_batch_size = per_device * self.world_size
        elif self.generation_batch_size != per_device * self.world_size:
            raise ValueError(f"generation_batch_size={self.generation_batch_size} must equal "
                             f"per_device_train_batch_size * steps_per_generation * processes = {per_device * self.world_size}")
        if self.num_generations < 1:
            raise ValueError(f"num_generations={self.num_generations}: expected >= 1")
        if per_device % self.num_generations:
            raise ValueError(f"each process generates per_device_train_batch_size * steps_per_generation = {per_device} "
                             f"completions per generation, which must be a multiple of num_generations="
                             f"{self.num_generations} (whole groups per process)")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations={self.num_iterations}: expected >= 1")
        if self.max_resample_rounds < 0:
            raise ValueError(f"max_resample_rounds={self.max_resample_rounds}: expected >= 0")
        if self.top_k < 0 or not 0 <= self.min_p <= 1:
            raise ValueError(f"top_k={self.top_k}, min_p={self.min_p}: expected top_k >= 0 and min_p in [0, 1]")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(f"max_completion_length={self.max_completion_length}: expected >= 1")
        if self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ValueError("epsilon and epsilon_high must be >= 0")
        if self.importance_sampling_mode not in ("truncate", "mask"):
            raise ValueError(f"importance_sampling_mode={self.importance_sampling_mode!r}: expected 'truncate' or 'mask'")
        if self.importance_sampling_high is None:
            self.importance_sampling_high = self.importance_sampling_cap
        if not 0 <= self.importance_sampling_low < self.importance_sampling_high:
            raise ValueError(f"importance_sampling_low={self.importance_sampling_low}, importance_sampling_high="
                             f"{self.importance_sampling_high}: expected 0 <= low < high")
        if self.log_completions_steps < 1:
            raise ValueError(f"log_completions_steps={self.log_completions_steps}: expected >= 1")

    @property
    def prompts_per_generation(self) -> int:
        """Prompts one process generates for at once."""
        return self.per_device_train_batch_size * self.steps_per_generation // self.num_generations


@dataclass
class RewardFuncArgs:
    """Command-line / YAML reward functions of the online methods."""

    # in YAML an entry may also be a mapping {name: ..., <option>: <value>} (checked by posttrain.cli_config)
    yaml_field_types: ClassVar[dict[str, Any]] = {"reward_funcs": list[str | dict] | None}

    reward_funcs: list[str] | None = field(default=None, metadata=_help(
        "Reward functions: built-in names (accuracy, format, think_format, length, soft_overlong, arithmetic, "
        "arithmetic_format, arithmetic_steps), TRL's command-line names (accuracy_reward, reasoning_accuracy_reward, "
        "think_format_reward, get_soft_overlong_punishment), import paths 'package.module:func', or reward model "
        "folders. In YAML an entry may also be a mapping {name: <built-in or path>, <option>: <value>} for a "
        "configured built-in. Default: arithmetic (the built-in task's reward) when no reward model is given."))


_REWARD_MODEL_PATH_HELP = ("A trained reward model (folder, hub name or tiny:<spec>), put before the reward functions "
                           "(as TRL's CLI does, so reward_weights line up the same way). Also "
                           "--reward_model_name_or_path (TRL's name).")


@dataclass
class RewardArgs(RewardFuncArgs):
    """`RewardFuncArgs` plus the reward model, for the methods whose TRL config has no ``reward_model_path``."""

    reward_model_path: str | None = field(default=None, metadata={
        "help": _REWARD_MODEL_PATH_HELP, "aliases": ["--reward_model_name_or_path"]})


@dataclass
class RewardModelPathField:
    """TRL's ``reward_model_path`` config field (PPO, Online DPO, Nash-MD, XPO): the reward model the trainer
    loads when no reward model object is passed to it; on the command line the config's flag."""

    reward_model_path: str | None = field(default=None, metadata={
        "help": _REWARD_MODEL_PATH_HELP + " Loaded by the trainer when no reward model object is passed to it.",
        "aliases": ["--reward_model_name_or_path"]})


def with_reward_model_path(reward_funcs: Any, args: Any) -> list:
    """``reward_funcs`` as a list with ``args.reward_model_path`` (when set) first: the trainers of the configs
    with `RewardModelPathField` call this when no reward model object was passed."""
    funcs = [] if reward_funcs is None else (list(reward_funcs) if isinstance(reward_funcs, (list, tuple))
                                             else [reward_funcs])
    path = getattr(args, "reward_model_path", None)
    return [path, *funcs] if path else funcs


def _cli_reward(spec: Any) -> Any:
    """A reward-function entry of the command line: TRL's CLI names become the built-in that computes the same
    reward; a bare name that is no built-in, no import path and no folder is an error listing the known names."""
    from ..online.rewards.builtin import TRL_CLI_REWARDS, builtin_factory, builtin_names, make_trl_cli_reward

    if not isinstance(spec, str):
        return spec
    if spec in TRL_CLI_REWARDS:
        return make_trl_cli_reward(spec)
    looks_like_path = any(ch in spec for ch in ".:/\\") or os.path.exists(spec)
    if builtin_factory(spec) is None and not looks_like_path:
        raise ValueError(f"unknown reward function {spec!r}: expected a built-in ({', '.join(builtin_names())}), "
                         f"one of TRL's command-line names ({', '.join(sorted(TRL_CLI_REWARDS))}), an import path "
                         "'package.module:func' or a reward model folder")
    return spec


def reward_trainer_kwargs(script: object, rewards: RewardFuncArgs, config: Any = None) -> dict:
    """`MethodSpec.trainer_kwargs` of the online methods: the reward functions from the parsed arguments
    (the reward model first, then `reward_funcs` in order; `arithmetic` when neither is given). A config with
    its own ``reward_model_path`` (`RewardModelPathField`) has the trainer load it: it is not added here."""
    path = getattr(rewards, "reward_model_path", None)
    funcs: list[Any] = [path] if path else []
    funcs += [_cli_reward(spec) for spec in rewards.reward_funcs or []]
    if not funcs and getattr(config, "reward_model_path", None):
        return {"reward_funcs": None}
    return {"reward_funcs": funcs or ["arithmetic"]}
