"""The online loop every online method shares: ``rollout -> score -> prepare -> train``.

Per generation, on each process (`posttrain.online.pipeline` holds the values between the stages):

1. **rollout** (`rollout`): this process's next prompts go to the one `RolloutEngine`, which samples
   ``num_generations`` completions per prompt with the latest weights it was given (`_catch_up_engine`:
   the engine may lag the policy by at most ``vllm_sync_every - 1`` optimizer steps; it never lags at
   evaluation).
2. **score** (`score`): reward functions (or whatever the method scores with: judges, teachers) turn the
   completions into a `ScoredRollout`. Dynamic sampling (``dynamic_sampling=True``) drops the groups the
   method calls uninformative (`informative_groups`) and refills with new prompts.
3. **prepare** (`prepare`): everything the loss needs that depends on the current weights: the loss
   mask, old log-probs (when a generation outlives one optimizer step), reference log-probs, the
   sampler's log-probs (importance sampling), the method's advantages (`compute_advantages`), metrics.
4. **train**: the prepared `RolloutBatch` is split into ``steps_per_generation`` micro-batches of whole
   groups and each is trained ``num_iterations`` times (`compute_loss` -> the method's `policy_loss`).

`RolloutLoader` drives 1-3 in place of a data loader. Loss normalization lives in one place,
`get_batch_samples`: it counts the loss tokens of the optimizer step over every micro-batch and process,
and hands each micro-batch ``num_items_in_batch = step tokens / (processes * micro-batches)``. A loss
normalized by that count (DAPO's) is then exact after the Trainer's usual ``1 / gradient_accumulation``
and DDP's gradient average; losses normalized per micro-batch ignore it.

Subclasses implement `compute_advantages` and `policy_loss`, and may override any stage.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from typing import Any, ClassVar

import torch

from ..data import DatasetKind, FormatInfo
from ..data.streaming import StreamPrompts, TokenizedStream
from ..losses.policy_gradient import masked_mean
from ..ops import unwrap_model
from ..online.completions_log import completions_table_rows, log_completions
from ..online.engine_factory import make_engine
from ..online.engines import RolloutEngine, SamplingParams, default_stop_token_ids, encode_prompts
from ..online.multiturn import Agent, AgentSpec
from ..online.logprobs import (batched_completion_logps, completion_logps, completion_mask, pad_values,
                               partial_grad_completion_logps)
from ..online.pipeline import PromptStream, RolloutLoader, ScoredRollout
from ..online.rewards import RewardComposer
from ..online.rollout_batch import RolloutBatch
from ._online_config import OnlineConfig
from ._reference import reference_context, resolve_reference
from .base import PostTrainer

logger = logging.getLogger(__name__)

__all__ = ["OnlineTrainer"]

_STATE_FILE = "online_state.json"


def _collate_rows(rows: list[dict]) -> dict[str, Any]:
    return {"rows": rows}


def _is_conversation(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


class OnlineTrainer(PostTrainer):
    """Base class of the online methods (see the module docstring)."""

    accepted_formats: ClassVar = (DatasetKind.PROMPT_ONLY, DatasetKind.PROMPT_COMPLETION)
    config_class: ClassVar = OnlineConfig
    #: GRPO and RLOO learn from reward functions alone; methods that score with judges or teachers don't need any.
    requires_reward_funcs: ClassVar[bool] = False

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
        tools: list | None = None,
        rollout_func: Any = None,
        environment_factory: Any = None,
        **kwargs: Any,
    ) -> None:
        funcs = [] if reward_funcs is None else (list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs])
        agent = AgentSpec(tools, environment_factory, rollout_func)  # multi-turn rollouts (online/multiturn.py)
        funcs += agent.reward_funcs  # an environment's get_reward() scores too
        if self.requires_reward_funcs and not funcs:
            raise ValueError(f"{type(self).__name__} needs at least one reward function (reward_funcs=...)")
        args = self.resolve_args(args)
        if args.async_generation and engine is not None:
            raise ValueError("async_generation=True generates with its own rollout worker (or the server at "
                             "vllm_server_base_url): drop engine=, or set async_generation=False to use it")
        super().__init__(model, args, data_collator=_collate_rows, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, peft_config=peft_config,
                         callbacks=callbacks, optimizers=optimizers, **kwargs)
        self.model_accepts_loss_kwargs = False  # the Trainer divides each micro-batch's loss by the accumulation steps
        self._check_prompt_lengths()
        self.agent = None
        if agent:
            self.agent = Agent(agent, self.tokenizer, num_generations=args.num_generations,
                               max_completion_length=args.max_completion_length,
                               max_tool_calling_iterations=args.max_tool_calling_iterations, tool_timeout=args.tool_timeout,
                               chat_template_kwargs=args.chat_template_kwargs)
        self.reward_composer = None
        if funcs:
            self.reward_composer = RewardComposer(funcs, args.reward_weights, reward_processing_classes,
                                                  max_completion_length=args.max_completion_length)
        self.ref_model = None
        if self.uses_reference:
            self.ref_model = resolve_reference(self.model, ref_model, load=lambda name: self.load_model(name, args))
            if self.ref_model is not None:
                self.ref_model = self.ref_model.to(self.args.device)
        self._engine = engine
        self._engine_ready = False
        self._split_rng = torch.Generator().manual_seed(args.seed)
        self._prompts: PromptStream | None = None
        self._loader: RolloutLoader | None = None
        self._resume_state: dict | None = None
        self._last_table_step = -1
        self.timings: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)
        self._async = None  # AsyncGeneration while train() runs with async_generation (trainers/_async.py)
        if args.async_generation:
            from ._async import WeightSyncCallback
            self.add_callback(WeightSyncCallback(self))

    def _check_prompt_lengths(self) -> None:
        """Warn with the count of prompts ``max_prompt_length`` cuts; resolve ``max_completion_length=None``
        to the model's context length minus the longest prompt."""
        args, data = self.args, self.train_dataset
        if data is None or "prompt_ids" not in data.column_names:
            return
        cut = sum(data["prompt_truncated"]) if "prompt_truncated" in data.column_names else 0
        if cut:
            self._totals["train/data/truncated_prompts"] = float(cut)
            side = "first" if getattr(args, "truncation_mode", "keep_end") == "keep_start" else "last"
            logger.warning("max_prompt_length=%s cuts %d of %d training prompts (they keep their %s tokens; "
                           "counted in data/truncated_prompts). Set max_prompt_length=None to keep whole prompts.",
                           args.max_prompt_length, cut, len(data), side)
        if args.max_completion_length is None:
            context = getattr(unwrap_model(self.model).config, "max_position_embeddings", None)
            if context is None:
                raise ValueError("max_completion_length=None needs a model config with max_position_embeddings; "
                                 "set max_completion_length to a number of tokens")
            longest = max(len(ids) for ids in data["prompt_ids"])
            if longest >= context:
                raise ValueError(f"the longest prompt has {longest} tokens, the model's context {context}: "
                                 "nothing is left to generate (set max_prompt_length)")
            args.max_completion_length = context - longest

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

    def compute_advantages(self, scored: ScoredRollout, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
        """Advantages (``[N]`` per sequence or ``[N, Lc]`` per token) and metrics, from the scores."""
        raise NotImplementedError

    def informative_groups(self, scored: ScoredRollout) -> torch.Tensor:
        """``[num_prompts]`` bool: the groups worth training on (dynamic sampling and
        ``skip_zero_variance_groups`` keep these); by default the ones whose rewards are not all equal."""
        valid = scored.rewards.valid
        total = torch.where(valid, scored.rewards.total, torch.nan).view(-1, self.args.num_generations)
        spread = total.nan_to_num(0.0).amax(1) - total.nan_to_num(0.0).amin(1)
        return (spread > 1e-6) & (valid.view(-1, self.args.num_generations).sum(1) > 1)

    def policy_loss(self, logps: torch.Tensor, batch: RolloutBatch, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The method's loss from the policy's completion log-probs ``[b, Lc]``."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------- engine
    @property
    def engine(self) -> RolloutEngine:
        """The rollout engine, created on first use (from the config's engine fields)."""
        if self._engine is None:
            self._engine = make_engine(self.args, self.model, self.tokenizer)  # starts with our weights
            self._engine.weights_version = self.state.global_step
            self._engine_ready = True
        elif not self._engine_ready:  # an engine passed in: give it this model's weights once
            self._engine.sync_weights(self.model, force=True)
            self._engine.weights_version = self.state.global_step
            self._engine_ready = True
        return self._engine

    def _catch_up_engine(self, max_lag: int) -> None:
        """Push the policy's weights to the engine when it is more than ``max_lag`` optimizer steps behind."""
        engine, version = self.engine, self.state.global_step
        if engine.samples_from_policy or version - engine.weights_version <= max_lag:
            return
        if self._async is not None and self._async.source is not None:  # evaluation while the producer runs
            self._async.source.push_weights(self.model, version)
            self._async.source.wait_for_push(self.args.vllm_server_timeout)
            return
        start = time.perf_counter()
        engine.sync_weights(self.model, force=True)
        engine.weights_version = version
        self.timings["sync"] += time.perf_counter() - start

    @property
    def importance_sampling(self) -> bool:
        """Whether the loss corrects for the sampler with truncated importance weights: by default when the
        engine is not the policy itself, or when top-k / top-p / min-p / repetition penalty make the sampled
        distribution differ from the policy's (every engine then reports the same corrected log-probs)."""
        flag = self.args.importance_sampling_correction
        if flag is not None:
            return bool(flag)
        a = self.args
        reshaped = a.top_k > 0 or a.top_p < 1.0 or a.min_p > 0 or a.repetition_penalty != 1.0
        return reshaped or not self.engine.samples_from_policy

    def close(self) -> None:
        """Release the engine (vLLM memory, server connection)."""
        if self._engine is not None:
            self._engine.close()

    # --------------------------------------------------------------------------------------- data
    def tokenize_row(self, row: dict, info: FormatInfo) -> dict:
        try:
            ids = encode_prompts(self.tokenizer, [row["prompt"]], self.args.chat_template_kwargs)[0]
        except (ValueError, TypeError) as err:
            raise ValueError(f"cannot tokenize prompt {row['prompt']!r}: {err}") from None
        ids, truncated = self.cut_prompt(ids)
        return {**row, "prompt_ids": ids, "prompt_truncated": truncated}

    def cut_prompt(self, ids: list[int]) -> tuple[list[int], bool]:
        """``ids`` cut to ``max_prompt_length`` tokens, and whether they were: the last ones are kept, or the
        first with ``truncation_mode='keep_start'`` (the configs with TRL's SFT fields: GKD)."""
        limit = self.args.max_prompt_length
        if limit is None or len(ids) <= limit:
            return ids, False
        keep_start = getattr(self.args, "truncation_mode", "keep_end") == "keep_start"
        return (ids[:limit] if keep_start else ids[-limit:]), True

    def make_collator(self) -> Any:
        return _collate_rows

    def prompt_source(self) -> PromptStream | StreamPrompts:
        """Where training prompts come from: a seeded shuffle of the dataset, or a streamed dataset in order."""
        args = self.args
        if isinstance(self.train_dataset, TokenizedStream):
            return StreamPrompts(self.train_dataset, args.prompts_per_generation, args.world_size, args.process_index)
        return PromptStream(self.train_dataset, args.prompts_per_generation, args.world_size, args.process_index,
                            seed=args.seed, shuffle=getattr(args, "shuffle_dataset", True))

    def stream_options(self, info: FormatInfo, name: str) -> dict[str, Any]:
        if self.args.max_completion_length is None:
            raise ValueError(f"{name}: max_completion_length=None is resolved from the longest prompt, which a "
                             "streamed dataset does not know ahead: set max_completion_length to a number of tokens")
        return {}

    def get_train_dataloader(self) -> RolloutLoader:
        args = self.args
        self._prompts = self.prompt_source()
        self._loader = RolloutLoader(self._next_generation, self._prompts.chunks_per_epoch, args.steps_per_generation,
                                     args.num_iterations, self._split_rng, start_micro_step=self._resumed_micro_step)
        if self._resume_state is not None:
            self._prompts.load_state_dict(self._resume_state["prompts"])
            self._loader.generations = self._resume_state["generations"]
        if self._async is not None:
            resumed = self._resume_state or {}
            self._async.start_item = int(resumed.get("prompts", {}).get("item", resumed.get("generations", 0)))
        return self._loader

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, str):
            dataset = self.eval_dataset[dataset]
        if "prompt_ids" not in dataset.column_names:  # a raw dataset handed to evaluate()
            dataset = self.prepare_dataset(dataset, "eval")
        size = max(1, self.args.per_device_eval_batch_size // self.generations_per_prompt("eval"))
        return self._get_dataloader(dataset, "Evaluation", batch_size=size, sampler_fn=self._get_eval_sampler)

    def _prepare_inputs(self, inputs: Any) -> RolloutBatch:
        if isinstance(inputs, RolloutBatch):  # a training micro-batch, already prepared
            return inputs
        scored = self.score(inputs["rows"], self.rollout(inputs["rows"], "eval"), "eval")
        return self.prepare(scored, "eval")

    # -------------------------------------------------------------------------- the four stages
    def generations_per_prompt(self, mode: str = "train") -> int:
        """``num_generations``; at evaluation ``num_generations_eval`` when it is set (TRL's field)."""
        n_eval = getattr(self.args, "num_generations_eval", None)
        return n_eval if mode == "eval" and n_eval is not None else self.args.num_generations

    def sampling_params(self, mode: str = "train", round_: int | None = None, refill: int = 0) -> SamplingParams:
        """The rollout's sampling settings, with a seed of its own: ``args.seed``, the process, and the
        micro-step the generation starts at (``round_``; evaluation reuses one seed; dynamic sampling's
        refills get seeds of their own), so that every engine (HF, vLLM colocated, the server) samples
        reproducibly from run to run (a resumed run included) and processes do not draw the same completions."""
        a = self.args
        if round_ is None:
            round_ = self.state.global_step * a.gradient_accumulation_steps if mode == "train" else 0
        offset = 1 if mode == "train" else 0
        base = a.seed * 1_000_003 + round_ * 2 + offset + refill * 2 * 1_000_033
        seed = (base * max(a.world_size, 1) + a.process_index) % (1 << 31)
        return SamplingParams(n=self.generations_per_prompt(mode), temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                              min_p=a.min_p, repetition_penalty=a.repetition_penalty,
                              max_new_tokens=a.max_completion_length, seed=seed)

    def rollout(self, rows: list[dict], mode: str, params: SamplingParams | None = None):
        """Stage 1: ``num_generations`` completions per prompt from the engine, grouped by prompt."""
        self._catch_up_engine(self.args.vllm_sync_every - 1 if mode == "train" else 0)
        start = time.perf_counter()
        rollout = self.generate_rollout(rows, params or self.sampling_params(mode), mode)
        if mode == "train":
            self.timings["generate"] += time.perf_counter() - start
        return rollout

    def generate_rollout(self, rows: list[dict], params: SamplingParams, mode: str = "train",
                         engine: RolloutEngine | None = None):
        """The completions of ``rows``: one engine call, or with tools / environments / a ``rollout_func``
        the multi-turn loop of `posttrain.online.multiturn.Agent` (which logs its tools/* metrics)."""
        engine = engine or self.engine
        if self.agent is None:
            return engine.generate([r["prompt_ids"] for r in rows], params).check()
        if getattr(self, "_agent_stop_ids", None) is None:
            self._agent_stop_ids = default_stop_token_ids(self.tokenizer, self.model, end_of_turn=True)
        rollout, metrics = self.agent.rollout(self, engine, rows, params, self._agent_stop_ids)
        self.store_metrics(metrics, mode)
        return rollout

    def score(self, rows: list[dict], rollout: Any, mode: str) -> ScoredRollout:
        """Stage 2: the reward functions' scores. Completions of a conversational prompt are handed to them
        as ``[{"role": "assistant", "content": text}]``, of a plain-text prompt as text (decided per row)."""
        start = time.perf_counter()
        completions = [[{"role": "assistant", "content": text}] if _is_conversation(rows[k]["prompt"]) else text
                       for k, text in zip(rollout.prompt_index, rollout.texts)]
        if rollout.messages is not None:  # multi-turn: assistant turns with their tool calls, tool results
            completions = rollout.messages
        scored = ScoredRollout(rows, rollout, completions, weight_version=self.engine.weights_version)
        if self.reward_composer is not None:
            agent_columns = dict(rollout.extra_fields or {})
            if rollout.environments is not None:
                agent_columns["environments"] = rollout.environments
            scored.rewards = self.reward_composer(scored.prompts, completions, rollout.completion_ids,
                                                  **scored.columns(), **agent_columns, **self._reward_extras(mode))
        if mode == "train":
            self.timings["score"] += time.perf_counter() - start
        return scored

    def _reward_extras(self, mode: str) -> dict[str, Any]:
        """TRL's extra reward-function arguments (taken by the functions that accept them)."""
        def log_metric(name: str, value: float) -> None:
            self.store_metrics({name: value}, mode)

        self._table_extras: dict[str, list] = {}

        def log_extra(column: str, values: list) -> None:
            """A column of per-completion values for the completions table."""
            self._table_extras[column] = list(values)

        return {"trainer_state": self.state, "log_metric": log_metric, "log_extra": log_extra}

    @torch.no_grad()
    def prepare(self, scored: ScoredRollout, mode: str) -> RolloutBatch:
        """Stage 3: the batch the loss trains on, with every tensor that depends on the current weights."""
        args, device = self.args, self.args.device
        start = time.perf_counter()
        rollout = scored.rollout
        lengths = [len(c) for c in rollout.completion_ids]
        mask = completion_mask(lengths, device).float()
        if args.mask_truncated_completions:
            mask[torch.tensor(rollout.truncated, dtype=torch.bool, device=device)] = 0.0
        if rollout.tool_mask is not None:  # tool results and template text between turns: out of the loss and KL
            mask = mask * pad_values(rollout.tool_mask, device)
        batch = RolloutBatch(rollout.prompt_ids, rollout.completion_ids, mask, group_ids=scored.group_ids)
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
        advantages, metrics = self.compute_advantages(scored, batch)
        batch.advantages = advantages.to(device)
        if mode == "train":
            self.timings["prepare"] += time.perf_counter() - start
            self.counts["completions"] += len(lengths)
            self.counts["completion_tokens"] += sum(lengths)
            self.counts["tokens"] += sum(lengths) + sum(len(p) for p in rollout.prompt_ids)
        metrics.update(scored.metrics)
        metrics.update(self._rollout_metrics(scored))
        self.store_metrics(metrics, mode)
        self._maybe_log_table(mode, scored, batch.advantages)
        return batch

    def _next_generation(self, index: int) -> RolloutBatch:
        """Stages 1-3 for generation ``index`` (what `RolloutLoader` calls once per generation)."""
        args = self.args
        states = self._loader.prompt_states
        states[index] = self._async.state_before_next() if self._async is not None else self._prompts.state_dict()
        for old in [k for k in states if k < index - 8]:
            del states[old]
        round_ = index * args.steps_per_generation * args.num_iterations
        scored = self._scored_rollout(round_)
        keep_groups = args.dynamic_sampling or getattr(args, "skip_zero_variance_groups", False)
        if keep_groups and scored.rewards is not None:
            scored = self._informative_only(scored, round_)
        return self.prepare(scored, "train")

    def _scored_rollout(self, round_: int, refill: int = 0) -> ScoredRollout:
        if self._async is not None:  # made ahead by the producer (seeded by its own generation index)
            return self._async.next(round_, refill)
        rows = self._prompts.next_rows()
        rollout = self.rollout(rows, "train", self.sampling_params("train", round_, refill))
        return self.score(rows, rollout, "train")

    def _informative_only(self, scored: ScoredRollout, round_: int) -> ScoredRollout:
        """Keep the informative groups; with ``dynamic_sampling``, refill with new prompts (up to
        ``max_resample_rounds`` rounds) until the generation has as many groups as it started with."""
        args, target = self.args, len(scored.rows)
        sampled = [scored]
        kept = [scored.select_groups(self.informative_groups(scored).nonzero().flatten().tolist())]
        rounds = 0
        while args.dynamic_sampling and sum(len(k.rows) for k in kept) < target and rounds < args.max_resample_rounds:
            rounds += 1
            more = self._scored_rollout(round_, refill=rounds)
            sampled.append(more)
            kept.append(more.select_groups(self.informative_groups(more).nonzero().flatten().tolist()))
        merged = ScoredRollout.concat(kept) if any(len(k) for k in kept) else kept[0]
        if args.dynamic_sampling and len(merged.rows) > target:
            merged = merged.select_groups(list(range(target)))
        sampled_groups = sum(len(s.rows) for s in sampled)
        merged.metrics.update(self._reward_metrics(ScoredRollout.concat(sampled)))
        merged.metrics["dynamic_sampling/dropped_groups"] = float(sampled_groups - len(merged.rows))
        merged.metrics["dynamic_sampling/refill_rounds"] = float(rounds)
        merged.metrics["dynamic_sampling/kept_groups"] = float(len(merged.rows))
        self.counts["dropped_groups"] += sampled_groups - len(merged.rows)
        merged.metrics["_sampled"] = 1.0  # the reward metrics above cover every sampled group
        return merged

    # ------------------------------------------------------------------------------ log-prob helpers
    @property
    def _logps_temperature(self) -> float:
        return self.args.temperature if self.args.temperature > 0 else 1.0

    def _logps_kwargs(self) -> dict[str, Any]:
        return dict(padding_free=self.args.padding_free, temperature=self._logps_temperature,
                    chunk_size=self.args.logits_chunk_size, pad_token_id=self.tokenizer.pad_token_id or 0)

    def _needs_old_logps(self) -> bool:
        a = self.args
        return a.num_iterations > 1 or a.steps_per_generation > a.gradient_accumulation_steps

    # --------------------------------------------------------------------------------- metrics
    def _reward_metrics(self, scored: ScoredRollout) -> dict[str, float]:
        if scored.rewards is None:
            return {}
        g = scored.group_size
        metrics = scored.rewards.metrics()
        grouped = scored.rewards.total.view(-1, g)
        group_std = grouped.std(dim=1) if g > 1 else torch.zeros(grouped.shape[0])
        metrics["frac_reward_zero_std"] = float((group_std < 1e-6).float().mean())
        return metrics

    def _rollout_metrics(self, scored: ScoredRollout) -> dict[str, float]:
        metrics = {} if scored.metrics.pop("_sampled", None) else self._reward_metrics(scored)
        rollout = scored.rollout
        if not len(rollout):
            return metrics
        lens = torch.tensor([len(c) for c in rollout.completion_ids] if rollout.tool_mask is None else
                            [sum(m) for m in rollout.tool_mask], dtype=torch.float32)  # TRL: tool tokens not counted
        truncated = torch.tensor(rollout.truncated, dtype=torch.bool)
        done = lens[~truncated]
        nan = float("nan")
        metrics.update({
            "completions/mean_length": float(lens.mean()), "completions/min_length": float(lens.min()),
            "completions/max_length": float(lens.max()), "completions/clipped_ratio": float(truncated.float().mean()),
            "completions/mean_terminated_length": float(done.mean()) if done.numel() else nan,
            "completions/min_terminated_length": float(done.min()) if done.numel() else nan,
            "completions/max_terminated_length": float(done.max()) if done.numel() else nan,
        })
        return metrics

    def _maybe_log_table(self, mode: str, scored: ScoredRollout, advantages: torch.Tensor) -> None:
        args, step = self.args, self.state.global_step
        if mode != "train" or not args.log_completions or not self.is_world_process_zero():
            return
        if step % args.log_completions_steps or step == self._last_table_step:
            return
        self._last_table_step = step
        rewards = scored.rewards
        per_func = {} if rewards is None else {n: rewards.per_func[:, j].tolist() for j, n in enumerate(rewards.names)}
        per_func.update(getattr(self, "_table_extras", {}))
        adv = advantages if advantages.dim() == 1 else advantages.sum(1)
        rows = completions_table_rows(scored.prompts, scored.rollout.texts, per_func, adv.tolist(),
                                      args.num_completions_to_print)
        if getattr(args, "log_unique_prompts", False):  # each prompt once (its first completion)
            rows = list({json.dumps(r["prompt"], default=str): r for r in reversed(rows)}.values())[::-1]
        log_completions(rows, step, args.report_to, callbacks=self.callback_handler.callbacks)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds TRL's ``num_tokens``: prompt and completion tokens generated for training so far, over every
        process (every process logs at the same point, so the gather stays in lockstep)."""
        if not any(k.startswith("eval_") for k in logs):
            local = torch.tensor([self.counts["tokens"]], dtype=torch.float64, device=self.args.device)
            logs = {**logs, "num_tokens": float(self.accelerator.gather(local).sum())}
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------- train
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The optimizer step's micro-batches, each told the loss-token normalizer of the whole step:
        ``num_items_in_batch = (loss tokens over these micro-batches and all processes) / (processes *
        micro-batches)``. The Trainer divides every micro-batch's loss by the number of micro-batches and
        DDP averages over processes, so a loss that sums its tokens and divides by this count is normalized
        by the step's global token count, as DAPO asks, whatever the accumulation and the process count."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        real = [b for b in batches if b is not None]
        if real:
            local = torch.tensor([sum(b.num_loss_tokens for b in real)], device=self.args.device, dtype=torch.float64)
            total = float(self.accelerator.gather(local).sum())
            per_micro = total / (self.accelerator.num_processes * len(real))
            for b in real:
                b.num_items_in_batch = per_micro
        return batches, None

    def training_step(self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        start = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.timings["train"] += time.perf_counter() - start
        return loss

    def _rows_needing_gradient(self, batch: RolloutBatch) -> torch.Tensor | None:
        """``[B]`` bool: completions whose loss gradient can be non-zero; ``None`` when all can (or when
        skipping is off, not exact for this loss, or nothing would be skipped)."""
        if not (self.args.skip_zero_advantage_backward and self.zero_advantage_means_zero_gradient
                and self.model.training and torch.is_grad_enabled()):
            return None
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:  # a sharded forward is a collective: no per-process branch
            return None
        adv = batch.advantages
        needs = (adv != 0).reshape(adv.shape[0], -1).any(dim=1)
        return None if bool(needs.all()) else needs

    def compute_loss(self, model: torch.nn.Module, inputs: RolloutBatch, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if len(inputs) == 0:  # every completion was left out: a zero loss that still reaches the graph
            loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            return (loss, None) if return_outputs else loss
        needs_grad = self._rows_needing_gradient(inputs)
        if needs_grad is None:
            out = completion_logps(model, inputs.prompt_ids, inputs.completion_ids, with_entropy=True,
                                   **self._logps_kwargs())
        else:
            # at least one completion keeps its gradient (see partial_grad_completion_logps); the rows without
            # one run on the bare module, so no process runs an extra collective (DDP) that the others don't
            self.counts["completions_without_backward"] += float(len(needs_grad) - max(int(needs_grad.sum()), 1))
            out = partial_grad_completion_logps(model, inputs.prompt_ids, inputs.completion_ids, needs_grad,
                                                no_grad_model=self.model, with_entropy=True, **self._logps_kwargs())
        mask = inputs.completion_mask
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            self.counts["trained_tokens"] += float(mask.sum())
        inputs.policy_entropy = out.entropy  # for methods whose loss uses token entropies (GRPO's controls)
        loss, metrics = self.policy_loss(out.logps, inputs, mask)
        metrics["entropy"] = masked_mean(out.entropy.detach(), mask)
        self.store_metrics(metrics, mode)
        return (loss, out) if return_outputs else loss

    # ------------------------------------------------------------------------------- checkpoints
    def _resumed_micro_step(self) -> int:
        """Micro-batches already trained when iteration starts (the Trainer skips as many on resume)."""
        if self._resume_state is None or self.args.ignore_data_skip:
            return 0
        return self.state.global_step * self.args.gradient_accumulation_steps

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        self._resume_state = None
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str) and os.path.exists(os.path.join(checkpoint, _STATE_FILE)):
            with open(os.path.join(checkpoint, _STATE_FILE)) as f:
                self._resume_state = json.load(f)
            self.counts = defaultdict(float, self._resume_state.get("counts", {}))
        if not self.args.async_generation:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        from ._async import AsyncGeneration

        self._async = AsyncGeneration(self)
        self._async.set_threads()
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:  # also on errors: no worker outlives train()
            self._async.stop()
            self._async = None

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self._loader is None or not self.is_world_process_zero():
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        with open(os.path.join(folder, _STATE_FILE), "w") as f:
            json.dump(self._online_state(), f)

    def _online_state(self) -> dict[str, Any]:
        """Where the prompt stream and the seeds stand at the saved step: a generation that is only partly
        trained is made again on resume, from the same prompts and seed."""
        loader, per_gen = self._loader, self._loader.micro_batches_per_generation
        done = self.state.global_step * self.args.gradient_accumulation_steps
        generations = -(-done // per_gen)  # generations whose micro-batches were started
        partial = done % per_gen != 0
        current = self._async.state_before_next() if self._async is not None else self._prompts.state_dict()
        state = loader.prompt_states.get(generations - 1 if partial else generations, current)
        return {"prompts": state, "generations": generations - 1 if partial else generations,
                "weights_version": self.state.global_step, "counts": dict(self.counts)}
