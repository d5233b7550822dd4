"""What GKD and on-policy distillation share: a frozen teacher, a per-generation choice of who writes the
completions, and the token-level divergence loss, all on the online loop (`posttrain.trainers._online`).

Per generation the loop's stages are:

1. **rollout**: `completion_source` picks who writes the completions: the student, through the rollout
   engine (on-policy), the teacher through an engine of its own (sequence-level KD), or the dataset.
2. **score**: nothing to score (the teacher is read in the loss).
3. **prepare**: the loss mask; on logging steps the teacher's and the student's log-probs of the
   completions (metrics only).
4. **train**: `compute_loss` runs student and teacher on prompt + completion and takes the generalized
   JSD (`beta`; 0 forward KL, 1 reverse KL) between their next-token distributions at every completion
   token, from hidden states and each output head in chunks (`posttrain.online.logprobs.completion_divergence`:
   neither model's ``[B, L, V]`` logits are held), reduced by `posttrain.losses.distill.distillation_loss`
   (the optimizer step's token mean).

``temperature`` divides both models' logits in the loss and the sampler's (TRL's GKDTrainer uses it for
sampling only; TRL's DistillationTrainer, like us, for both).
"""

from __future__ import annotations

import random
from typing import Any, ClassVar

import torch

from ..data import DatasetKind, FormatInfo, tokenize_prompt_completion
from ..losses.distill import distillation_loss
from ..losses.policy_gradient import masked_mean
from ..online.engine_hf import HFEngine
from ..online.engines import Rollout, SamplingParams
from ..online.logprobs import batched_completion_logps, completion_divergence
from ..online.pipeline import ScoredRollout
from ..online.rollout_batch import RolloutBatch
from ._online import OnlineTrainer
from ._online_trl import OnlineTRLMixin
from ._teacher import TeacherArgs, attach_teacher

__all__ = ["TeacherArgs", "DistillTrainerBase"]  # TeacherArgs re-exported for the configs

SOURCES = ("student", "teacher", "data")


def _split_messages(messages: list[dict], index: int) -> tuple[list[dict], list[dict]]:
    """A conversation as (prompt turns, [last assistant turn])."""
    if len(messages) < 2 or messages[-1].get("role") != "assistant":
        raise ValueError(f"row {index}: a 'messages' conversation for distillation must end with an assistant turn "
                         f"after at least one other turn (got roles {[m.get('role') for m in messages]})")
    return list(messages[:-1]), [messages[-1]]


class DistillTrainerBase(OnlineTrainer):
    """Base of `GKDTrainer` and `DistillationTrainer` (see the module docstring). Subclasses set
    `completion_source`."""

    accepted_formats: ClassVar = (DatasetKind.PROMPT_ONLY, DatasetKind.PROMPT_COMPLETION, DatasetKind.LANGUAGE_MODELING)

    def __init__(self, model: Any = None, teacher_model: Any = None, args: Any = None, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None, callbacks: list | None = None,
                 optimizers: tuple = (None, None), quantization_config: Any = None, peft_config: Any = None,
                 tools: Any = None, *, data_collator: Any = None, compute_metrics: Any = None,
                 preprocess_logits_for_metrics: Any = None, engine: Any = None, **kwargs: Any) -> None:
        """TRL 1.16 DistillationTrainer's argument order; `GKDTrainer` reorders for TRL's GKDTrainer."""
        if data_collator is not None:
            raise ValueError(f"{type(self).__name__} builds its batches from the rollouts (prompts, then student, "
                             "teacher or dataset completions): drop data_collator=")
        if tools:
            raise ValueError(f"{type(self).__name__} does not run tool calls: drop tools=")
        args = self.resolve_args(args)
        if quantization_config is not None:
            if not isinstance(model, str):
                raise ValueError("quantization_config applies to a model loaded by name; this one is already loaded")
            args.model_init_kwargs = {**(args.model_init_kwargs or {}), "quantization_config": quantization_config}
        self._row_index = 0
        super().__init__(model, None, args, train_dataset, eval_dataset, processing_class, peft_config=peft_config,
                         callbacks=callbacks, optimizers=optimizers, engine=engine, compute_metrics=compute_metrics,
                         preprocess_logits_for_metrics=preprocess_logits_for_metrics, **kwargs)
        attach_teacher(self, teacher_model)
        if isinstance(self, OnlineTRLMixin):  # DistillationTrainer: TRL 1.16's shared online fields
            self._setup_online_trl()
        self._teacher_engine: HFEngine | None = None
        self._last_source = "student"
        self._prepare_mode = "train"

    # ------------------------------------------------------------------------------------------ data
    def tokenize_row(self, row: dict, info: FormatInfo) -> dict:
        """Prompt ids (as the engine would encode them) and, for prompt-completion or conversational rows,
        the dataset completion's ids (``completion_ids``; cut to ``max_completion_length``)."""
        index, self._row_index = self._row_index, self._row_index + 1
        if info.kind is DatasetKind.LANGUAGE_MODELING:
            if not info.conversational:
                raise ValueError("distillation takes prompts (prompt / prompt-completion data) or 'messages' "
                                 "conversations; plain 'text' rows have no prompt to complete")
            prompt, completion = _split_messages(row["messages"], index)
            row = {k: v for k, v in row.items() if k != "messages"}
            row.update(prompt=prompt, completion=completion)
        if "completion" not in row:
            return super().tokenize_row(row, info)
        try:
            out = tokenize_prompt_completion(self.tokenizer, row["prompt"], row["completion"], tools=row.get("tools"))
        except ValueError as err:
            raise ValueError(f"row {index}: {err}") from None
        ids, truncated = self.cut_prompt(out["prompt_ids"])
        completion_ids = out["completion_ids"][: self.args.max_completion_length]
        return {**row, "prompt_ids": ids, "prompt_truncated": truncated, "completion_ids": completion_ids}

    def _has_completions(self, rows: list[dict]) -> bool:
        return bool(rows) and all(r.get("completion_ids") for r in rows)

    # ------------------------------------------------------------------------------ stage 1: rollout
    def completion_source(self, rows: list[dict], mode: str, round_: int) -> str:
        """Who writes this generation's completions: "student", "teacher" or "data"."""
        raise NotImplementedError

    def _coin(self, round_: int) -> float:
        """A uniform draw in [0, 1) seeded by the run's seed, the process and the generation."""
        a = self.args
        return random.Random((a.seed * 1_000_003 + round_) * max(a.world_size, 1) + a.process_index).random()

    @property
    def teacher_engine(self) -> HFEngine:
        """The rollout engine on the teacher (sequence-level KD), made on first use."""
        if self._teacher_engine is None:
            self._teacher_engine = HFEngine(self.teacher, self.tokenizer, max_batch_size=self.args.generation_max_batch_size)
        return self._teacher_engine

    def rollout(self, rows: list[dict], mode: str, params: SamplingParams | None = None) -> Rollout:
        params = params or self.sampling_params(mode)
        round_ = self.state.global_step * self.args.gradient_accumulation_steps
        source = self.completion_source(rows, mode, round_ if mode == "train" else -1)
        if source not in SOURCES:
            raise ValueError(f"completion_source returned {source!r}: expected one of {SOURCES}")
        self._last_source = source
        if source == "student":
            return super().rollout(rows, mode, params)
        if source == "teacher":
            return self.teacher_engine.generate([r["prompt_ids"] for r in rows], params).check()
        n = params.n
        completions = [list(r["completion_ids"]) for r in rows for _ in range(n)]
        return Rollout(prompt_index=[k for k in range(len(rows)) for _ in range(n)],
                       prompt_ids=[r["prompt_ids"] for r in rows for _ in range(n)], completion_ids=completions,
                       texts=self.tokenizer.batch_decode(completions, skip_special_tokens=True),
                       logprobs=[[0.0] * len(c) for c in completions], truncated=[False] * len(completions))

    def score(self, rows: list[dict], rollout: Any, mode: str) -> ScoredRollout:
        scored = super().score(rows, rollout, mode)
        scored.metrics["on_policy"] = float(self._last_source == "student")
        scored.metrics["teacher_generated"] = float(self._last_source == "teacher")
        return scored

    # ------------------------------------------------------------------------------ stage 3: prepare
    @property
    def uses_reference(self) -> bool:
        return False  # `beta` selects the divergence here; there is no reference model

    @property
    def importance_sampling(self) -> bool:
        return False  # the loss reads both full distributions; no sampled-token ratio to correct

    def _needs_old_logps(self) -> bool:
        return False

    def prepare(self, scored: ScoredRollout, mode: str) -> RolloutBatch:
        self._prepare_mode = mode
        return super().prepare(scored, mode)

    def compute_advantages(self, scored: ScoredRollout, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
        """No advantages; on logging steps (and in evaluation), the mean log-probs of the completions under
        teacher and student (two forwards without gradients, for the metrics only)."""
        metrics: dict[str, float] = {}
        logging_step = self.state.global_step % max(int(self.args.logging_steps), 1) == 0
        if logging_step or getattr(self, "_prepare_mode", "train") == "eval":
            kw = dict(batch_size=self.args.per_device_train_batch_size, vocab_size=self.vocab_size,
                      **self._logps_kwargs())
            mask = batch.completion_mask
            for name, module in (("teacher", self.teacher), ("student", self.model)):
                logps = batched_completion_logps(module, batch.prompt_ids, batch.completion_ids, **kw)
                metrics[f"{name}_logps/mean"] = float(masked_mean(logps, mask[:, : logps.shape[1]]))
        return torch.zeros(len(batch)), metrics

    # ------------------------------------------------------------------------------- stage 4: train
    def compute_loss(self, model: torch.nn.Module, inputs: RolloutBatch, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        args = self.args
        if len(inputs) == 0:
            loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            return (loss, None) if return_outputs else loss
        divergence, _ = completion_divergence(
            model, self.teacher, inputs.prompt_ids, inputs.completion_ids, kind="jsd", beta=args.beta,
            temperature=self._logps_temperature, padding_free=args.padding_free, chunk_size=args.logits_chunk_size,
            pad_token_id=self.tokenizer.pad_token_id or 0, vocab_size=self.vocab_size)
        mask = inputs.completion_mask[:, : divergence.shape[1]]
        loss, metrics = distillation_loss(divergence, mask,
                                          inputs.num_items_in_batch if self.model.training else None)
        if self.model.training:
            self.counts["trained_tokens"] += float(mask.sum())
        self.store_metrics(metrics, "train" if self.model.training else "eval")
        return (loss, None) if return_outputs else loss

    def close(self) -> None:
        super().close()
        if self._teacher_engine is not None:
            self._teacher_engine.close()
