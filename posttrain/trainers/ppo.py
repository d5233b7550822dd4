"""PPO with a learned critic (Schulman et al. 2017; the RLHF recipe of Ziegler et al. 2019 and Ouyang et al.
2022), and REINFORCE++ (Hu et al. 2025) on the same loop.

Per generation (``prepare``, `PPOTrainer.compute_advantages`): each completion's score (reward functions
and/or a reward model, minus ``missing_eos_penalty`` when it never stopped) becomes a per-token reward,
``-kl_coef * KL_t`` on every token plus the score on the last (`posttrain.losses.ppo.token_rewards`, KL
from the sampling policy's and the reference's log-probs). With the critic (``advantage_estimator="gae"``)
its values give GAE advantages and returns (`gae_advantages`), the advantages whitened over the batch;
without one, REINFORCE++'s returns-to-go normalized over the batch (``"reinforce_pp"``; ``"reinforce_pp_
baseline"`` first subtracts each prompt's mean score). Training (`policy_loss`) is the clipped surrogate
(optionally dual-clipped) plus ``vf_coef`` times the clipped value loss, ``num_ppo_epochs`` passes over
``num_mini_batches`` optimizer steps per generation (the loop's ``num_iterations`` and
``steps_per_generation = gradient_accumulation_steps * num_mini_batches``).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import TrainingArguments

from ..data import DatasetKind
from ..losses.policy_gradient import masked_mean
from ..losses.ppo import (KL_ESTIMATORS, explained_variance, gae_advantages, group_mean_baseline, masked_whiten,
                          ppo_policy_loss, ppo_value_loss, reinforce_pp_advantages, token_rewards)
from ..online.logprobs import batched_completion_logps
from ..online.pipeline import ScoredRollout
from ..online.rollout_batch import RolloutBatch
from ._online import OnlineTrainer
from ._online_config import OnlineConfig, RewardFuncArgs, RewardModelPathField, reward_trainer_kwargs, with_reward_model_path
from ._value import batched_completion_values, check_value_model, completion_values, default_value_model
from .registry import register_method

__all__ = ["PPOConfig", "PPOTrainer", "ADVANTAGE_ESTIMATORS", "ppo_batch_sizes"]

ADVANTAGE_ESTIMATORS = ("gae", "reinforce_pp", "reinforce_pp_baseline")
_VALUE_DIR = "value_model"
_TOKEN_IDS = "prompt_token_ids"  # TRL's tokenized prompts, kept as given


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class PPOConfig(RewardModelPathField, OnlineConfig):
    """Configuration of `PPOTrainer`: TRL's PPOConfig fields (names and defaults) on top of the online fields.

    TRL's names map onto the loop's: ``num_ppo_epochs`` is ``num_iterations``, ``num_mini_batches`` optimizer
    steps of ``per_device_train_batch_size * gradient_accumulation_steps`` completions make one generation,
    ``response_length`` is ``max_completion_length``, ``cliprange`` is ``epsilon``. ``reward_model_path`` is
    loaded when no ``reward_model`` object is passed; its default is None, not TRL's
    ``"EleutherAI/pythia-160m"`` (a hub model TRL's example script loads; nothing here needs a hub by default).
    """

    num_ppo_epochs: int = field(default=4, metadata=_help("Passes over each generation batch (the loop's num_iterations)."))
    num_mini_batches: int = field(default=1, metadata=_help("Optimizer steps (mini-batches) per generation and pass."))
    response_length: int = field(default=53, metadata=_help("Most tokens generated per completion (max_completion_length)."))
    total_episodes: int | None = field(default=None, metadata=_help(
        "Completions to train on in total; sets max_steps when max_steps is not given (default: num_train_epochs "
        "passes over the prompts)."))
    kl_coef: float = field(default=0.05, metadata=_help("KL coefficient of the per-token reward (0: no reference model)."))
    kl_estimator: str = field(default="k1", metadata=_help("Per-token KL estimator in the reward: k1 (log-ratio) or k3."))
    cliprange: float = field(default=0.2, metadata=_help("Clip range of the policy ratio."))
    vf_coef: float = field(default=0.1, metadata=_help("Weight of the value loss."))
    cliprange_value: float = field(default=0.2, metadata=_help("Clip range of the value update."))
    gamma: float = field(default=1.0, metadata=_help("Discount factor."))
    lam: float = field(default=0.95, metadata=_help("GAE lambda."))
    whiten_rewards: bool = field(default=False, metadata=_help("Rescale the per-token rewards over the batch (mean kept)."))
    missing_eos_penalty: float | None = field(default=None, metadata=_help(
        "Subtracted from the score of a completion that ran into response_length without a stop token."))
    stop_token: str | None = field(default=None, metadata=_help(
        "'eos' or None: completions always end at the tokenizer's EOS on every engine (TRL's 'eos')."))
    stop_token_id: int | None = field(default=None, metadata=_help("An extra token id that ends a completion."))
    local_rollout_forward_batch_size: int = field(default=64, metadata=_help(
        "Completions per no-grad forward when computing old/reference log-probs and values."))
    num_sample_generations: int = field(default=10, metadata=_help(
        "Accepted for TRL compatibility; the completions table is logged every log_completions_steps."))
    sft_model_path: str | None = field(default=None, metadata=_help("Accepted for TRL compatibility (unused)."))
    model_adapter_name: str | None = field(default=None, metadata=_help("Accepted for TRL compatibility (unused)."))
    ref_adapter_name: str | None = field(default=None, metadata=_help("Accepted for TRL compatibility (unused)."))
    exp_name: str = field(default="ppo", metadata=_help("Name of the experiment (TRL's field)."))
    ds3_gather_for_generation: bool = field(default=True, metadata=_help("Accepted for TRL compatibility."))
    # ---- TRL's computed sizes: None, filled in by the trainer (`PPOTrainer._fill_batch_sizes`); a value set here
    # must agree with the run's, else ValueError
    world_size: int | None = field(default=None, metadata=_help(
        "Processes of the run (computed; reads the actual number, a value given must match it)."))
    local_batch_size: int | None = field(default=None, metadata=_help(
        "Completions one process generates per rollout: per_device_train_batch_size * steps_per_generation "
        "(= * gradient_accumulation_steps * num_mini_batches by default; computed)."))
    micro_batch_size: int | None = field(default=None, metadata=_help(
        "Completions in one forward/backward over all processes: per_device_train_batch_size * world_size (computed)."))
    batch_size: int | None = field(default=None, metadata=_help(
        "Completions per rollout over all processes: local_batch_size * world_size (computed)."))
    mini_batch_size: int | None = field(default=None, metadata=_help(
        "Completions per optimizer step over all processes: local_mini_batch_size * world_size (computed)."))
    local_mini_batch_size: int | None = field(default=None, metadata=_help(
        "Completions per optimizer step on one process: per_device_train_batch_size * gradient_accumulation_steps "
        "(= local_batch_size / num_mini_batches by default; computed)."))
    num_total_batches: int | None = field(default=None, metadata=_help(
        "Rollouts (generation batches) in the run: ceil(total_episodes / batch_size), or what max_steps / "
        "num_train_epochs amount to (computed; None for a stream of unknown length)."))
    # ---- beyond TRL
    advantage_estimator: str = field(default="gae", metadata=_help(
        "gae: PPO with a critic; reinforce_pp: REINFORCE++ (no critic, returns normalized over the batch); "
        "reinforce_pp_baseline: the same after subtracting each prompt's mean score (needs num_generations > 1)."))
    dual_clip: float | None = field(default=None, metadata=_help(
        "Dual-clip constant c > 1: caps the loss of negative-advantage tokens at -c * A (None: off)."))
    value_learning_rate: float | None = field(default=None, metadata=_help(
        "Peak learning rate of the value model (same schedule as the policy's). Default: learning_rate. A fresh "
        "critic head usually wants a larger one than a pretrained policy."))
    save_value_model: bool = field(default=False, metadata=_help(
        "Also save the trained value model to <output_dir>/value_model when saving the policy."))
    # ---- overridden defaults (TRL's PPO values)
    num_generations: int = field(default=1, metadata=_help("Completions per prompt (PPO: 1)."))
    num_iterations: int | None = field(default=None, metadata=_help("Default: num_ppo_epochs."))
    max_completion_length: int | None = field(default=None, metadata=_help("Default: response_length."))
    temperature: float = field(default=0.7, metadata=_help("Sampling temperature (log-probs use the same)."))
    learning_rate: float = field(default=3e-6, metadata=_help("Peak learning rate of AdamW."))

    def __post_init__(self) -> None:
        if self.max_completion_length is None:
            self.max_completion_length = self.response_length
        self.response_length = self.max_completion_length
        if self.num_iterations is None:
            self.num_iterations = self.num_ppo_epochs
        self.num_ppo_epochs = self.num_iterations
        if self.num_mini_batches < 1:
            raise ValueError(f"num_mini_batches={self.num_mini_batches}: expected >= 1")
        if self.steps_per_generation is None and self.generation_batch_size is None:
            self.steps_per_generation = self.gradient_accumulation_steps * self.num_mini_batches
        self.epsilon = self.cliprange
        super().__post_init__()
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r}: expected one of {KL_ESTIMATORS}")
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage_estimator={self.advantage_estimator!r}: expected one of {ADVANTAGE_ESTIMATORS}")
        if self.advantage_estimator == "reinforce_pp_baseline" and self.num_generations < 2:
            raise ValueError("advantage_estimator='reinforce_pp_baseline' subtracts each prompt's mean score: it "
                             "needs num_generations >= 2")
        if self.stop_token not in (None, "eos"):
            raise ValueError(f"stop_token={self.stop_token!r}: expected 'eos' or None")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip={self.dual_clip}: expected a constant > 1 (or None)")
        if self.total_episodes is not None and self.max_steps <= 0:
            generations = math.ceil(self.total_episodes / self.generation_batch_size)
            self.max_steps = generations * self.num_iterations * self.steps_per_generation // self.gradient_accumulation_steps


def _world_size(self: PPOConfig) -> int:
    return TrainingArguments.world_size.fget(self)


def _declare_world_size(self: PPOConfig, value: int | None) -> None:
    self.__dict__["_declared_world_size"] = value


# TRL's PPOConfig has a ``world_size`` field where TrainingArguments has a property: the field's value is kept as a
# declaration (checked by the trainer) and reading it still gives the run's number of processes
PPOConfig.world_size = property(_world_size, _declare_world_size, doc="Processes of the run (TrainingArguments').")

_SIZE_FIELDS = ("world_size", "local_batch_size", "micro_batch_size", "batch_size", "mini_batch_size",
                "local_mini_batch_size", "num_total_batches")


def ppo_batch_sizes(args: PPOConfig, world_size: int, dataset_len: int | None) -> dict[str, int | None]:
    """TRL's PPO batch sizes, as they are in this run's loop (TRL's definitions: a rollout of ``batch_size``
    completions over all processes, optimizer steps of ``mini_batch_size``, forwards of ``micro_batch_size``).
    With ``num_mini_batches=1``, or whenever ``steps_per_generation = gradient_accumulation_steps *
    num_mini_batches`` (the default), the numbers equal TRL 1.12's ``PPOTrainer`` arithmetic."""
    local = args.per_device_train_batch_size * args.steps_per_generation
    local_mini = args.per_device_train_batch_size * args.gradient_accumulation_steps
    batch = local * world_size
    steps_per_rollout = args.steps_per_generation * args.num_iterations / args.gradient_accumulation_steps
    if args.total_episodes is not None:
        total = math.ceil(args.total_episodes / batch)
    elif args.max_steps > 0:
        total = math.ceil(args.max_steps / steps_per_rollout)
    elif dataset_len is not None:
        total = math.ceil(args.num_train_epochs * dataset_len / batch)
    else:
        total = None
    return {"world_size": world_size, "local_batch_size": local,
            "micro_batch_size": args.per_device_train_batch_size * world_size, "batch_size": batch,
            "mini_batch_size": local_mini * world_size, "local_mini_batch_size": local_mini, "num_total_batches": total}


def _as_list(funcs: Any) -> list:
    return [] if funcs is None else (list(funcs) if isinstance(funcs, (list, tuple)) else [funcs])


class PPOTrainer(OnlineTrainer):
    """PPO trainer with TRL's signature: ``PPOTrainer(args, processing_class, model, ref_model, reward_model,
    train_dataset, value_model, data_collator=None, eval_dataset=None, optimizers=(None, None), callbacks=None,
    peft_config=None)``.

    Beyond TRL: ``reward_funcs`` (functions, built-in names, reward model folders; weighted by
    ``args.reward_weights``) instead of or beside ``reward_model``; prompt-only datasets (plain or
    conversational) as well as tokenized ``input_ids``; ``value_model=None`` starts a critic from the reward
    model (when it reads the policy's tokens) or from the policy; ``engine``: an explicit `RolloutEngine`.
    ``data_collator`` is accepted and ignored (rollouts are batched by the loop).
    """

    config_class: ClassVar = PPOConfig
    accepted_formats: ClassVar = (DatasetKind.PROMPT_ONLY, DatasetKind.PROMPT_COMPLETION)
    _tag_names: ClassVar = ["posttrain", "ppo"]

    def __init__(self, args: PPOConfig | TrainingArguments | None = None, processing_class: Any = None,
                 model: Any = None, ref_model: Any = None, reward_model: Any = None, train_dataset: Any = None,
                 value_model: Any = None, data_collator: Any = None, eval_dataset: Any = None,
                 optimizers: tuple = (None, None), callbacks: list | None = None, peft_config: Any = None, *,
                 reward_funcs: Any = None, reward_processing_classes: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("PPOTrainer needs a policy model (model=...)")
        funcs = _as_list(reward_funcs)
        procs = reward_processing_classes
        if reward_model is None and getattr(args, "reward_model_path", None):
            # TRL's field: the reward model to load when none is passed; it scores first (as in TRL's script)
            funcs = with_reward_model_path(funcs, args)
            if isinstance(procs, (list, tuple)):
                procs = [None, *procs]
        if reward_model is not None:
            # TRL's reward model reads the policy's tokens: by default it scores with the policy's tokenizer
            if procs is not None and not isinstance(procs, (list, tuple)):
                procs = [procs] * len(funcs)
            procs = list(procs or [None] * len(funcs)) + [processing_class]
            funcs = funcs + [reward_model]
        if not funcs:
            raise ValueError("PPOTrainer needs something to score completions with: reward_model=... or reward_funcs=...")
        resolved = self.resolve_args(args)
        if peft_config is not None and ref_model is not None:
            ref_model = None  # the reference is the policy's base with its adapters disabled: no second copy
        self._value_spec = (value_model, reward_model if isinstance(reward_model, torch.nn.Module) else None)
        self.value_model: torch.nn.Module | None = None
        super().__init__(model, funcs, resolved, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, reward_processing_classes=procs, peft_config=peft_config,
                         callbacks=callbacks, optimizers=optimizers, ref_model=ref_model, **kwargs)
        if self.value_model is None:  # no PEFT: prepare_peft_config was not reached with a model to copy
            self._build_value_model(self.model)
        if self.value_model is not None:
            self.value_model.to(self.args.device)
        self._fill_batch_sizes()

    def _fill_batch_sizes(self) -> None:
        """Fill in TRL's computed size fields (`ppo_batch_sizes`); one the user set to another value is an error."""
        args = self.args
        try:
            length = len(self.train_dataset) if self.train_dataset is not None else None
        except TypeError:  # a stream
            length = None
        sizes = ppo_batch_sizes(args, self.accelerator.num_processes, length)
        declared = {name: getattr(args, name) for name in _SIZE_FIELDS if name != "world_size"}
        declared["world_size"] = args.__dict__.get("_declared_world_size")
        wrong = {k: (v, sizes[k]) for k, v in declared.items() if v is not None and v != sizes[k]}
        if wrong:
            detail = "; ".join(f"{k}={v} but this run's is {c}" for k, (v, c) in wrong.items())
            raise ValueError(f"PPOConfig: {detail}. These sizes are computed from per_device_train_batch_size, "
                             "gradient_accumulation_steps, num_mini_batches (steps_per_generation), the number of "
                             "processes and total_episodes / max_steps: leave them unset (None) or change those")
        for name, value in sizes.items():
            if name != "world_size":
                setattr(args, name, value)

    # ------------------------------------------------------------------------------ the critic
    @property
    def uses_critic(self) -> bool:
        return self.args.advantage_estimator == "gae"

    def prepare_peft_config(self, model: torch.nn.Module, args: Any, peft_config: Any) -> Any:
        """Build the critic from the policy before PEFT wraps it (a copy of the plain weights)."""
        self._build_value_model(model, args)
        return peft_config

    def _build_value_model(self, policy: torch.nn.Module, args: Any = None) -> None:
        args = args or self.args
        if self.value_model is not None or args.advantage_estimator != "gae":
            return
        given, reward_model = self._value_spec
        if isinstance(given, str):
            from ..models.loading import load_model
            given = load_model(given, task="seq-cls")
        value = given if given is not None else default_value_model(policy, reward_model)
        check_value_model(value, policy)
        value.train()
        self.value_model = value

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with the critic's parameters as a second group (same learning-rate schedule)."""
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if self.value_model is not None and not getattr(self, "_value_in_optimizer", False):
            params = [p for p in self.value_model.parameters() if p.requires_grad]
            lr = self.args.value_learning_rate or self.args.learning_rate
            self.optimizer.add_param_group({"params": params, "weight_decay": self.args.weight_decay, "lr": lr})
            self._value_in_optimizer = True
        return optimizer

    def _clip_grad_norm(self, model: Any) -> Any:
        """Clip the policy's gradients (the Trainer's way) and the critic's to the same ``max_grad_norm``."""
        if self.value_model is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.value_model.parameters(), self.args.max_grad_norm)
            self.store_metrics({"val/grad_norm": norm}, "train")
        return super()._clip_grad_norm(model)

    # ------------------------------------------------------------------------------------- data
    def prepare_dataset(self, dataset: Any, name: str) -> Any:
        """TRL's tokenized prompts (an ``input_ids`` column, no ``prompt``) get a decoded ``prompt`` column for
        the reward functions; their token ids are kept as the prompts (`tokenize_row`)."""
        columns = getattr(dataset, "column_names", None)
        if isinstance(columns, list) and "input_ids" in columns and "prompt" not in columns:
            tok = self.tokenizer

            def to_prompt(row: dict) -> dict:
                ids = self._strip_left_pad(row["input_ids"])
                return {"prompt": tok.decode(ids, skip_special_tokens=True), _TOKEN_IDS: ids}

            dropped = [c for c in ("input_ids", "attention_mask", "lengths") if c in columns]
            dataset = dataset.map(to_prompt, remove_columns=dropped)
        return super().prepare_dataset(dataset, name)

    def _strip_left_pad(self, ids: list[int]) -> list[int]:
        pad = self.tokenizer.pad_token_id
        start = 0
        while pad is not None and start < len(ids) - 1 and ids[start] == pad:
            start += 1
        return list(ids[start:])

    def tokenize_row(self, row: dict, info: Any) -> dict:
        if _TOKEN_IDS not in row:
            return super().tokenize_row(row, info)
        ids = row[_TOKEN_IDS]
        if not ids:
            raise ValueError(f"a row of input_ids is empty (prompt {row['prompt']!r}): every prompt needs a token")
        limit = self.args.max_prompt_length
        truncated = limit is not None and len(ids) > limit
        rest = {k: v for k, v in row.items() if k != _TOKEN_IDS}
        return {**rest, "prompt_ids": ids[-limit:] if truncated else ids, "prompt_truncated": truncated}

    # ------------------------------------------------------------------------------ the loop hooks
    @property
    def uses_reference(self) -> bool:
        return self.args.kl_coef != 0.0

    def _needs_old_logps(self) -> bool:
        return True  # the KL in the reward and the ratio both need the sampling policy's log-probs

    def _logps_batch_size(self) -> int:
        return self.args.local_rollout_forward_batch_size

    def sampling_params(self, mode: str = "train", round_: int | None = None, refill: int = 0) -> Any:
        params = super().sampling_params(mode, round_, refill)
        if self.args.stop_token_id is not None:
            params.stop_token_ids = list(params.stop_token_ids or []) + [self.args.stop_token_id]
        return params

    def compute_advantages(self, scored: ScoredRollout, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
        """Per-token rewards, then GAE (with the critic's values) or REINFORCE++ returns; metrics under TRL's names."""
        args: PPOConfig = self.args
        mask = batch.completion_mask
        device = mask.device
        rewards = scored.rewards
        scores = torch.where(rewards.valid, rewards.total, torch.zeros_like(rewards.total)).to(device).float()
        truncated = torch.tensor(scored.rollout.truncated, dtype=torch.bool, device=device)
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * truncated.float()
        if batch.get("old_logps") is None:  # evaluation: the current policy sampled these
            batch.old_logps = batched_completion_logps(self.model, batch.prompt_ids, batch.completion_ids,
                                                       batch_size=self._logps_batch_size(), **self._logps_kwargs())
        shaped = group_mean_baseline(scores, args.num_generations).to(device) \
            if args.advantage_estimator == "reinforce_pp_baseline" else scores
        token_r, kl, non_score = token_rewards(shaped, batch.old_logps, batch.get("ref_logps"), mask, args.kl_coef,
                                               args.kl_estimator)
        if args.whiten_rewards:
            token_r = masked_whiten(token_r, mask, shift_mean=False)
        metrics: dict[str, float] = {}
        if self.uses_critic:
            start = time.perf_counter()
            values = batched_completion_values(self.value_model, batch.prompt_ids, batch.completion_ids,
                                               self._logps_batch_size()).to(device)
            self.timings["value"] += time.perf_counter() - start  # part of "prepare"
            advantages, returns = gae_advantages(token_r, values, mask, args.gamma, args.lam)
            advantages = masked_whiten(advantages, mask)
            batch.values, batch.returns = values, returns
            metrics["val/explained_variance"] = float(explained_variance(values, returns, mask))
            metrics["val/mean"] = float(masked_mean(values, mask))
        else:
            advantages, _ = reinforce_pp_advantages(token_r, mask, args.gamma)
        mean_non_score = float(non_score.sum(1).mean())
        metrics.update({
            "objective/kl": float(kl.sum(1).mean()),
            "objective/entropy": float((-batch.old_logps * mask).sum(1).mean()),
            "objective/non_score_reward": mean_non_score,
            "objective/rlhf_reward": mean_non_score + float(scores.mean()),
            "objective/scores": float(scores.mean()),
            "val/num_eos_tokens": float((~truncated).sum()),
        })
        return advantages, metrics

    def policy_loss(self, logps: torch.Tensor, batch: RolloutBatch, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Clipped surrogate + ``vf_coef`` x clipped value loss (the critic runs on the same micro-batch)."""
        args: PPOConfig = self.args
        loss, pm = ppo_policy_loss(logps, batch.old_logps, batch.advantages, mask, args.cliprange, args.dual_clip)
        metrics = {"policy/approxkl_avg": pm["approxkl"], "policy/clipfrac_avg": pm["clipfrac"],
                   "loss/policy_avg": loss.detach(), "val/ratio": pm["ratio"]}
        if self.uses_critic:
            self.value_model.train(self.model.training)
            values = completion_values(self.value_model, batch.prompt_ids, batch.completion_ids)
            values = values[:, :mask.shape[1]]
            vf_loss, vm = ppo_value_loss(values, batch.values, batch.returns, mask, args.cliprange_value)
            loss = loss + args.vf_coef * vf_loss
            metrics.update({"loss/value_avg": vf_loss.detach(), "val/clipfrac_avg": vm["clipfrac"]})
        return loss, metrics

    # ------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.value_model is not None and self.is_world_process_zero():
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            self.value_model.save_pretrained(os.path.join(folder, _VALUE_DIR))

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str) and self.value_model is not None:
            folder = os.path.join(checkpoint, _VALUE_DIR)
            if not os.path.isdir(folder):
                raise ValueError(f"checkpoint {checkpoint} has no {_VALUE_DIR}/: it was not saved by PPOTrainer "
                                 "with a critic, so the value model cannot be restored")
            loaded = type(self.value_model).from_pretrained(folder)
            self.value_model.load_state_dict(loaded.state_dict())
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The policy, as every trainer saves it; with ``save_value_model`` also the critic in ``value_model/``."""
        super().save_model(output_dir, _internal_call)
        if self.args.save_value_model and self.value_model is not None and self.is_world_process_zero():
            self.value_model.save_pretrained(os.path.join(output_dir or self.args.output_dir, _VALUE_DIR))


register_method(
    "ppo", PPOConfig, PPOTrainer,
    help="PPO: actor-critic RL with GAE advantages, a value model and a KL-shaped per-token reward "
         "(advantage_estimator=reinforce_pp: REINFORCE++ without a critic).",
    extra_args=(RewardFuncArgs,), trainer_kwargs=reward_trainer_kwargs, task_format="prompt_only",
)
