"""MiniLLM: knowledge distillation as sequence-level reverse KL, optimized by policy gradient on the
student's own samples (Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models").

The GRPO loop (`posttrain.trainers.grpo`, on `posttrain.trainers._online`) with the teacher as the reward:

1. **rollout**: ``num_generations`` student samples per prompt through the rollout engine.
2. **score**: the teacher's per-token log-probs of the samples (``scores["teacher_logps"]``, a tensor
   reward ``[N, Lc]``; logits divided by ``kd_temperature``), plus any extra ``reward_funcs``.
3. **prepare**: the student's log-probs of the samples, then `posttrain.losses.distill.minillm_advantages`:
   per-token returns of ``log p_teacher - log q_student`` (discount ``gamma``, ``length_normalization``),
   minus the group's mean return (left out with ``rkl_advantage=False``); the extra rewards' group-relative
   advantages are added to every token.
4. **train**: `posttrain.losses.distill.minillm_loss`: the clipped policy gradient with those per-token
   advantages plus, with ``single_step_decomposition``, the exact reverse KL ``KL(q_t || p_t)`` over the
   vocabulary at every token (from hidden states and both heads in chunks, in the same student forward).

With ``single_step_decomposition`` a token's return counts only the rewards after it (its own part is
the exact single-step term), as in the paper; TRL adds the current token's sampled reward as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..losses.distill import minillm_advantages, minillm_loss
from ..online.logprobs import batched_completion_logps, completion_divergence, completion_logps
from ..online.pipeline import ScoredRollout
from ..online.rollout_batch import RolloutBatch
from ._online_config import RewardArgs
from ._teacher import TeacherArgs, attach_teacher
from .grpo import GRPOConfig, GRPOTrainer
from .registry import register_method

__all__ = ["MiniLLMConfig", "MiniLLMTrainer"]


@dataclass
class MiniLLMConfig(TeacherArgs, GRPOConfig):
    """Configuration of `MiniLLMTrainer` (TRL's MiniLLMConfig fields and defaults, on `GRPOConfig`)."""

    disable_dropout: bool = field(default=True, metadata={"help": "Turn off dropout in the student."})
    rkl_advantage: bool = field(default=True, metadata={"help": (
        "Add the reverse-KL advantage (returns of log p_teacher - log q_student, minus the group's mean) to the "
        "extra rewards' advantage. False: the advantage is the extra rewards' alone, and the teacher acts only "
        "through the single-step term.")})
    single_step_decomposition: bool = field(default=True, metadata={"help": (
        "Add the exact per-token reverse KL over the vocabulary (the paper's single-step decomposition) and "
        "leave the current token out of its return.")})
    kd_temperature: float = field(default=1.0, metadata={"help": (
        "Divides both models' logits in the teacher reward and the single-step KL.")})
    gamma: float = field(default=0.0, metadata={"help": "Discount of later tokens' rewards in a token's return."})
    length_normalization: bool = field(default=True, metadata={"help": (
        "Divide a token's return by the (discounted) number of tokens it sums over.")})

    def __post_init__(self) -> None:
        if self.num_generations == 1 and self.scale_rewards not in ("none", False, "false", "False"):
            self.scale_rewards = "none"  # a group of one has no spread to scale by
        super().__post_init__()
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature={self.kd_temperature}: expected > 0")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma={self.gamma}: expected a discount in [0, 1]")
        if self.beta != 0.0:
            raise ValueError(f"beta={self.beta}: MiniLLM's KL is to the teacher; a KL penalty to a reference "
                             "model is not supported here (set beta=0)")


class MiniLLMTrainer(GRPOTrainer):
    """MiniLLM: ``MiniLLMTrainer(model, teacher_model, reward_funcs=None, args, train_dataset, eval_dataset,
    processing_class, reward_processing_classes, callbacks, optimizers, peft_config, rollout_func=None)`` as in
    TRL 1.12. ``reward_funcs`` are optional extra rewards (verifiable rewards, as in
    GRPO); without them the teacher is the only signal."""

    config_class: ClassVar = MiniLLMConfig
    requires_reward_funcs: ClassVar = False
    _tag_names: ClassVar = ["posttrain", "minillm"]

    def __init__(self, model: Any = None, teacher_model: Any = None, reward_funcs: Any = None,
                 args: MiniLLMConfig | None = None, train_dataset: Any = None, eval_dataset: Any = None,
                 processing_class: Any = None, reward_processing_classes: Any = None, callbacks: list | None = None,
                 optimizers: tuple = (None, None), peft_config: Any = None, rollout_func: Any = None, *,
                 data_collator: Any = None, engine: Any = None, **kwargs: Any) -> None:
        if data_collator is not None or rollout_func is not None:
            raise ValueError("MiniLLMTrainer samples through its rollout engine and builds its own batches: drop "
                             "data_collator= / rollout_func= (pass engine= for a custom RolloutEngine)")
        super().__init__(model, reward_funcs, args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, reward_processing_classes=reward_processing_classes,
                         peft_config=peft_config, callbacks=callbacks, optimizers=optimizers, engine=engine, **kwargs)
        attach_teacher(self, teacher_model)
        a = self.args
        if not a.rkl_advantage and not a.single_step_decomposition and self.reward_composer is None:
            raise ValueError("rkl_advantage=False and single_step_decomposition=False leave MiniLLM nothing to "
                             "learn from without reward_funcs: keep one of them, or give reward functions")

    @property
    def uses_reference(self) -> bool:
        return False

    @property
    def importance_sampling(self) -> bool:
        return False  # minillm_loss has no sampler correction (the HF engine samples from the policy itself)

    @property
    def zero_advantage_means_zero_gradient(self) -> bool:
        return not self.args.single_step_decomposition

    def _teacher_kwargs(self) -> dict[str, Any]:
        return dict(padding_free=self.args.padding_free, temperature=self.args.kd_temperature,
                    chunk_size=self.args.logits_chunk_size, pad_token_id=self.tokenizer.pad_token_id or 0)

    # ---------------------------------------------------------------------------- stage 2: score
    def score(self, rows: list[dict], rollout: Any, mode: str) -> ScoredRollout:
        """The extra rewards (if any), and the teacher's per-token log-probs of the samples as a tensor reward."""
        scored = super().score(rows, rollout, mode)
        r = scored.rollout
        scored.scores["teacher_logps"] = batched_completion_logps(
            self.teacher, r.prompt_ids, r.completion_ids, batch_size=self.args.per_device_train_batch_size,
            vocab_size=self.vocab_size, **self._teacher_kwargs())
        return scored

    def informative_groups(self, scored: ScoredRollout) -> torch.Tensor:
        return torch.ones(len(scored.rows), dtype=torch.bool)  # the teacher's reward is per token: every group teaches

    # -------------------------------------------------------------------------- stage 3: prepare
    def compute_advantages(self, scored: ScoredRollout, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
        args: MiniLLMConfig = self.args
        student = batched_completion_logps(self.model, batch.prompt_ids, batch.completion_ids,
                                           batch_size=args.per_device_train_batch_size, vocab_size=self.vocab_size,
                                           **self._teacher_kwargs())
        teacher = scored.scores["teacher_logps"].to(student.device)
        mask = batch.completion_mask[:, : student.shape[1]] > 0
        rewards = scored.rewards.total if scored.rewards is not None else None
        adv, metrics = minillm_advantages(teacher, student, mask, args.num_generations, gamma=args.gamma,
                                          single_step=args.single_step_decomposition,
                                          length_normalization=args.length_normalization, rewards=rewards,
                                          scale_rewards=args.scale_rewards, rkl_advantage=args.rkl_advantage)
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["teacher_logps/mean"] = float((teacher * mask).sum() / mask.sum().clamp(min=1))
        metrics["student_logps/mean"] = float((student * mask).sum() / mask.sum().clamp(min=1))
        return adv, metrics

    # ---------------------------------------------------------------------------- stage 4: train
    def compute_loss(self, model: torch.nn.Module, inputs: RolloutBatch, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        args: MiniLLMConfig = self.args
        if len(inputs) == 0:
            loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            return (loss, None) if return_outputs else loss
        kw = dict(padding_free=args.padding_free, chunk_size=args.logits_chunk_size,
                  pad_token_id=self.tokenizer.pad_token_id or 0)
        single_step_kl = None
        if args.single_step_decomposition:
            single_step_kl, logps, _ = completion_divergence(
                model, self.teacher, inputs.prompt_ids, inputs.completion_ids, kind="reverse_kl",
                temperature=args.kd_temperature, vocab_size=self.vocab_size,
                student_logps_temperature=self._logps_temperature, **kw)
        else:
            logps = completion_logps(model, inputs.prompt_ids, inputs.completion_ids,
                                     temperature=self._logps_temperature, **kw).logps
        width = logps.shape[1]
        mask = inputs.completion_mask[:, :width]
        training = self.model.training
        if training:
            self.counts["trained_tokens"] += float(mask.sum())
        old = inputs.get("old_logps")
        loss, metrics = minillm_loss(
            logps, inputs.advantages[:, :width], mask, old_logps=old[:, :width] if old is not None else None,
            single_step_kl=single_step_kl, epsilon=args.epsilon, epsilon_high=args.epsilon_high,
            loss_type=args.loss_type, max_completion_length=args.max_completion_length,
            num_items_in_batch=inputs.num_items_in_batch if training else None)
        self.store_metrics(metrics, "train" if training else "eval")
        return (loss, None) if return_outputs else loss


def _minillm_trainer_kwargs(script: object, rewards: RewardArgs, config: Any = None) -> dict:
    """The extra reward functions of the command line (none by default: the teacher is the reward)."""
    from ._online_config import reward_trainer_kwargs

    if not rewards.reward_funcs and not rewards.reward_model_path:
        return {}
    return reward_trainer_kwargs(script, rewards)


register_method(
    "minillm", MiniLLMConfig, MiniLLMTrainer,
    help="MiniLLM: distill a teacher (--teacher_model_name_or_path) by policy gradient on the sequence-level "
         "reverse KL (teacher log-probs as the reward), optionally with extra reward functions.",
    extra_args=(RewardArgs,), trainer_kwargs=_minillm_trainer_kwargs, task_format="prompt_only",
)
