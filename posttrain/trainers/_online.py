"""What every online RL trainer shares: generate with one RolloutEngine, score, buffer, train, sync.

The loop, per process:

1. The data loader yields the same ``prompts_per_generation`` prompts ``steps_per_generation *
   num_iterations`` times in a row (`RepeatedChunkSampler`). On the first, `_prepare_inputs` asks the
   engine for ``num_generations`` completions per prompt (the engine, never ``model.generate``), scores
   them with the `RewardComposer`, computes what the loss needs at generation time (reference log-probs,
   old log-probs when the batch outlives the current policy, the sampler's log-probs for IS correction),
   lets the method turn rewards into advantages, and splits the result into micro-batches.
2. Each training step takes the next micro-batch from that buffer; `compute_loss` runs the policy
   (log-probs through `posttrain.ops`, padding-free) and the method's `policy_loss`.
3. After every optimizer step the engine gets the new weights (`RolloutEngine.sync_weights`; a no-op for
   the HF engine, every ``vllm_sync_every`` steps for vLLM and the server).

Subclasses implement `uses_reference`, `compute_advantages` and `policy_loss`.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any, ClassVar

import torch
from transformers import TrainerCallback

from ..data import DatasetKind, FormatInfo
from ..losses.policy_gradient import masked_mean
from ..models import is_peft_model
from ..online.completions_log import completions_table_rows, log_completions
from ..online.engine_factory import make_engine
from ..online.engines import RolloutEngine, SamplingParams, encode_prompts
from ..online.logprobs import (batched_completion_logps, completion_logps, completion_mask, pad_values,
                               partial_grad_completion_logps)
from ..online.rewards import RewardBatch, RewardComposer
from ..online.rollout_batch import RepeatedChunkSampler, RolloutBatch
from ._online_config import OnlineConfig
from ._reference import frozen_copy, reference_context
from .base import PostTrainer

logger = logging.getLogger(__name__)

__all__ = ["OnlineTrainer"]


def _collate_rows(rows: list[dict]) -> dict[str, Any]:
    return {"rows": rows}


class _EngineSyncCallback(TrainerCallback):
    """Pushes the trained weights to the rollout engine after every optimizer step."""

    def __init__(self, trainer: "OnlineTrainer") -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.sync_engine()


class OnlineTrainer(PostTrainer):
    """Base class of GRPO, RLOO and later online methods (see the module docstring)."""

    accepted_formats: ClassVar = (DatasetKind.PROMPT_ONLY, DatasetKind.PROMPT_COMPLETION)
    config_class: ClassVar = OnlineConfig

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: OnlineConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        peft_config: Any = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        ref_model: Any = None,
        engine: RolloutEngine | None = None,
        **kwargs: Any,
    ) -> None:
        if reward_funcs is None or (isinstance(reward_funcs, (list, tuple)) and not reward_funcs):
            raise ValueError("online training needs at least one reward function (reward_funcs=...)")
        args = args if args is not None else self.config_class()
        self._conversational = False
        super().__init__(model, args, data_collator=_collate_rows, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, peft_config=peft_config,
                         callbacks=callbacks, optimizers=optimizers, **kwargs)
        self.model_accepts_loss_kwargs = False  # losses normalize per micro-batch; the Trainer divides by GA
        self.reward_composer = RewardComposer(reward_funcs, args.reward_weights, reward_processing_classes,
                                              max_completion_length=args.max_completion_length)
        self.ref_model = None
        if self.uses_reference:
            if ref_model is not None:
                self.ref_model = frozen_copy(ref_model).to(self.args.device)
            elif not is_peft_model(self.model):
                self.ref_model = frozen_copy(self.model).to(self.args.device)
        self._engine = engine
        self._engine_ready = False
        self._buffer: list[RolloutBatch] = []
        self._micro_step = 0
        self._split_rng = torch.Generator().manual_seed(args.seed)
        self._last_table_step = -1
        self.timings: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)
        self.add_callback(_EngineSyncCallback(self))

    # ------------------------------------------------------------------------------ subclass hooks
    @property
    def uses_reference(self) -> bool:
        """Whether the loss or the reward needs the reference policy's log-probs."""
        return self.args.beta != 0.0

    @property
    def zero_advantage_means_zero_gradient(self) -> bool:
        """Whether the loss's gradient vanishes on a completion whose advantages are all 0 (true when the
        loss is the advantage-weighted (clipped) ratio alone: no KL or other per-token term)."""
        return False

    def compute_advantages(self, rewards: torch.Tensor, batch: RolloutBatch) -> tuple[torch.Tensor, dict, list[int] | None]:
        """Advantages ``[N]`` from total rewards ``[N]``; also metrics, and which completions to keep
        (``None``: all)."""
        raise NotImplementedError

    def policy_loss(self, logps: torch.Tensor, batch: RolloutBatch, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The method's loss from the policy's completion log-probs ``[b, Lc]``."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------- engine
    @property
    def engine(self) -> RolloutEngine:
        """The rollout engine, created on first use (from the config's engine fields)."""
        if self._engine is None:
            self._engine = make_engine(self.args, self.model, self.tokenizer)  # starts with our weights
            self._engine_ready = True
        elif not self._engine_ready:  # an engine passed in: give it this model's weights once
            self._engine.sync_weights(self.model, force=True)
            self._engine_ready = True
        return self._engine

    @property
    def importance_sampling(self) -> bool:
        flag = self.args.importance_sampling_correction
        return (not self.engine.samples_from_policy) if flag is None else bool(flag)

    def sync_engine(self) -> None:
        if self._engine is not None:
            start = time.perf_counter()
            self._engine.sync_weights(self.model)
            self.timings["sync"] += time.perf_counter() - start

    def close(self) -> None:
        """Release the engine (vLLM memory, server connection)."""
        if self._engine is not None:
            self._engine.close()

    # --------------------------------------------------------------------------------------- data
    def tokenize_row(self, row: dict, info: FormatInfo) -> dict:
        self._conversational = info.conversational
        try:
            ids = encode_prompts(self.tokenizer, [row["prompt"]])[0]
        except (ValueError, TypeError) as err:
            raise ValueError(f"cannot tokenize prompt {row['prompt']!r}: {err}") from None
        limit = self.args.max_prompt_length
        truncated = limit is not None and len(ids) > limit
        return {**row, "prompt_ids": ids[-limit:] if truncated else ids, "truncated": truncated}

    def make_collator(self) -> Any:
        return _collate_rows

    def get_train_dataloader(self) -> Any:
        args = self.args
        per_process = args.prompts_per_generation
        sampler = RepeatedChunkSampler(len(self.train_dataset), per_process * args.world_size,
                                       repeats=args.steps_per_generation * args.num_iterations, seed=args.seed)
        return self._get_dataloader(self.train_dataset, "Training", batch_size=per_process,
                                    sampler_fn=lambda _: sampler, is_training=True)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, str):
            dataset = self.eval_dataset[dataset]
        size = max(1, self.args.per_device_eval_batch_size // self.args.num_generations)
        return self._get_dataloader(dataset, "Evaluation", batch_size=size, sampler_fn=self._get_eval_sampler)

    # --------------------------------------------------------------------------------- generation
    def _prepare_inputs(self, inputs: dict[str, Any]) -> RolloutBatch:
        rows = inputs["rows"]
        if not self.model.training:
            return self.generate_and_score(rows, "eval")
        args = self.args
        slot = self._micro_step % (args.steps_per_generation * args.num_iterations)
        if slot == 0 or not self._buffer:
            batch = self.generate_and_score(rows, "train")
            self._buffer = batch.split(args.steps_per_generation, self._split_rng)
            self._set_dapo_denominators()
        self._micro_step += 1
        return self._buffer[slot % args.steps_per_generation]

    def _set_dapo_denominators(self) -> None:
        """Token count of each optimizer step's micro-batches, summed over processes, per process."""
        ga = self.args.gradient_accumulation_steps
        for start in range(0, len(self._buffer), ga):
            group = self._buffer[start : start + ga]
            local = torch.tensor([sum(b.num_loss_tokens for b in group)], device=self.args.device)
            total = float(self.accelerator.gather(local).sum())
            for b in group:
                b.dapo_denominator = total / self.accelerator.num_processes

    def sampling_params(self, mode: str = "train") -> SamplingParams:
        """The rollout's sampling settings, with a seed of its own: ``args.seed``, the process and the
        micro-step it generates at (evaluation reuses one seed), so that every engine (HF, vLLM colocated, the server)
        samples reproducibly from run to run (a resumed run included) and processes do not draw the same
        completions."""
        a = self.args
        ga = a.gradient_accumulation_steps
        round_ = self.state.global_step * ga + self._micro_step % ga if mode == "train" else 0
        offset = 1 if mode == "train" else 0
        seed = ((a.seed * 1_000_003 + round_ * 2 + offset) * max(a.world_size, 1) + a.process_index) % (1 << 31)
        return SamplingParams(n=a.num_generations, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                              min_p=a.min_p, repetition_penalty=a.repetition_penalty,
                              max_new_tokens=a.max_completion_length, seed=seed)

    @property
    def _logps_temperature(self) -> float:
        return self.args.temperature if self.args.temperature > 0 else 1.0

    def _logps_kwargs(self) -> dict[str, Any]:
        return dict(padding_free=self.args.padding_free, temperature=self._logps_temperature,
                    chunk_size=self.args.logits_chunk_size, pad_token_id=self.tokenizer.pad_token_id or 0)

    def _needs_old_logps(self) -> bool:
        a = self.args
        return a.num_iterations > 1 or a.steps_per_generation > a.gradient_accumulation_steps

    @torch.no_grad()
    def generate_and_score(self, rows: list[dict], mode: str) -> RolloutBatch:
        """Generate ``num_generations`` completions per prompt, score them and build the batch."""
        args, device = self.args, self.args.device
        t0 = time.perf_counter()
        rollout = self.engine.generate([r["prompt_ids"] for r in rows], self.sampling_params(mode)).check()
        t1 = time.perf_counter()
        prompts = [rows[k]["prompt"] for k in rollout.prompt_index]
        completions: list[Any] = list(rollout.texts)
        if self._conversational:
            completions = [[{"role": "assistant", "content": t}] for t in rollout.texts]
        columns = {key: [rows[k][key] for k in rollout.prompt_index] for key in rows[0]
                   if key not in ("prompt", "prompt_ids")}
        rewards = self.reward_composer(prompts, completions, rollout.completion_ids, **columns)
        t2 = time.perf_counter()
        lengths = [len(c) for c in rollout.completion_ids]
        mask = completion_mask(lengths, device).float()
        truncated = torch.tensor(rollout.truncated, device=device)
        if args.mask_truncated_completions:
            mask[truncated] = 0.0
        batch = RolloutBatch(rollout.prompt_ids, rollout.completion_ids, mask, torch.zeros(len(lengths), device=device))
        bs = args.per_device_train_batch_size
        if mode == "train" and self._needs_old_logps():
            batch.old_logps = batched_completion_logps(self.model, batch.prompt_ids, batch.completion_ids,
                                                       batch_size=bs, **self._logps_kwargs())
        if self.uses_reference:
            with reference_context(self.model, self.ref_model) as ref:
                batch.ref_logps = batched_completion_logps(ref, batch.prompt_ids, batch.completion_ids,
                                                           batch_size=bs, **self._logps_kwargs())
        if self.importance_sampling:
            batch.sampler_logps = pad_values(rollout.logprobs, device)
        advantages, metrics, keep = self.compute_advantages(rewards.total.to(device), batch)
        batch.advantages = advantages.to(device)
        t3 = time.perf_counter()
        if mode == "train":
            self.timings["generate"] += t1 - t0
            self.timings["score"] += t2 - t1
            self.timings["prepare"] += t3 - t2
            self.counts["completions"] += len(lengths)
            self.counts["completion_tokens"] += sum(lengths)
        metrics.update(self._rollout_metrics(rewards, lengths, rollout.truncated))
        self.store_metrics(metrics, mode)
        self._maybe_log_table(mode, prompts, rollout.texts, rewards, batch.advantages)
        if keep is not None:
            batch = batch.select(keep)
        return batch

    def _rollout_metrics(self, rewards: RewardBatch, lengths: list[int], truncated: list[bool]) -> dict[str, float]:
        g = self.args.num_generations
        metrics = rewards.metrics()
        grouped = rewards.total.view(-1, g)
        group_std = grouped.std(dim=1) if g > 1 else torch.zeros(grouped.shape[0])
        metrics["reward_std"] = float(group_std.mean())
        metrics["frac_reward_zero_std"] = float((group_std < 1e-6).float().mean())
        lens = torch.tensor(lengths, dtype=torch.float32)
        done = lens[~torch.tensor(truncated)]
        metrics.update({
            "completions/mean_length": float(lens.mean()), "completions/min_length": float(lens.min()),
            "completions/max_length": float(lens.max()),
            "completions/clipped_ratio": float(torch.tensor(truncated, dtype=torch.float32).mean()),
            "completions/mean_terminated_length": float(done.mean()) if done.numel() else float("nan"),
        })
        return metrics

    def _maybe_log_table(self, mode: str, prompts: list, texts: list[str], rewards: RewardBatch,
                         advantages: torch.Tensor) -> None:
        args, step = self.args, self.state.global_step
        if mode != "train" or not args.log_completions or not self.is_world_process_zero():
            return
        if step % args.log_completions_steps or step == self._last_table_step:
            return
        self._last_table_step = step
        per_func = {name: rewards.per_func[:, j].tolist() for j, name in enumerate(rewards.names)}
        rows = completions_table_rows(prompts, texts, per_func, advantages.tolist(), args.num_completions_to_print)
        log_completions(rows, step, args.report_to)

    # ------------------------------------------------------------------------------------- loss
    def training_step(self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        start = time.perf_counter()
        before = self.timings["generate"] + self.timings["score"] + self.timings["prepare"]
        loss = super().training_step(model, inputs, num_items_in_batch)
        spent = self.timings["generate"] + self.timings["score"] + self.timings["prepare"] - before
        self.timings["train"] += time.perf_counter() - start - spent
        return loss

    def _rows_needing_gradient(self, batch: RolloutBatch) -> torch.Tensor | None:
        """``[B]`` bool: completions whose loss gradient can be non-zero; ``None`` when all can (or when
        skipping is off, not exact for this loss, or nothing would be skipped)."""
        if not (self.args.skip_zero_advantage_backward and self.zero_advantage_means_zero_gradient
                and self.model.training and torch.is_grad_enabled()):
            return None
        adv = batch.advantages
        needs = (adv != 0).reshape(adv.shape[0], -1).any(dim=1)
        return None if bool(needs.all()) else needs

    def compute_loss(self, model: torch.nn.Module, inputs: RolloutBatch, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if len(inputs) == 0:  # every completion was skipped: a zero loss that still reaches the graph
            loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            return (loss, None) if return_outputs else loss
        needs_grad = self._rows_needing_gradient(inputs)
        if needs_grad is None:
            out = completion_logps(model, inputs.prompt_ids, inputs.completion_ids, with_entropy=True,
                                   **self._logps_kwargs())
        else:
            # at least one completion keeps its gradient (see partial_grad_completion_logps)
            self.counts["completions_without_backward"] += float(len(needs_grad) - max(int(needs_grad.sum()), 1))
            out = partial_grad_completion_logps(model, inputs.prompt_ids, inputs.completion_ids, needs_grad,
                                                with_entropy=True, **self._logps_kwargs())
        mask = inputs.completion_mask
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            self.counts["trained_tokens"] += float(mask.sum())
        loss, metrics = self.policy_loss(out.logps, inputs, mask)
        metrics["entropy"] = masked_mean(out.entropy.detach(), mask)
        self.store_metrics(metrics, mode)
        return (loss, out) if return_outputs else loss
