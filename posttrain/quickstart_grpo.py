"""The quickstart's RL stage: GRPO on the arithmetic task's training prompts that SFT had no solutions for.

The SFT model already writes worked solutions, but samples go wrong at a digit often; sampling
``grpo_generations`` of them per problem and rewarding the right answer and the reference steps stated
(built-in rewards ``arithmetic`` and ``arithmetic_steps``) sharpens it toward its correct solutions, which
raises held-out greedy accuracy. It runs on the HF engine in the training process.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["grpo_stage"]


def grpo_stage(model: Any, tokenizer: Any, task: Any, opts: Any, results: dict) -> Any:
    """Train ``model`` with GRPO for ``opts.grpo_steps`` steps; record the reward curve in ``results``."""
    from .files import copy_file
    from .trainers.grpo import GRPOConfig, GRPOTrainer

    from .quickstart import stage_split

    prompts, _ = stage_split(task, opts, "prompt_only", "grpo")  # the problems SFT saw no solution of
    out = os.path.join(opts.output_dir, "grpo")
    config = GRPOConfig(
        output_dir=out,
        max_steps=opts.grpo_steps,
        learning_rate=opts.grpo_learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=0.1,
        num_generations=opts.grpo_generations,
        per_device_train_batch_size=opts.grpo_batch_size,
        temperature=opts.grpo_temperature,
        max_completion_length=64,
        max_prompt_length=64,
        beta=0.0,
        loss_type="dapo",
        weight_decay=0.0,
        logging_steps=5 if opts.grpo_steps >= 20 else 1,
        log_completions=True,
        log_completions_steps=max(1, opts.grpo_steps // 2),
        num_completions_to_print=3,
        save_strategy="no",
        report_to="none",
        seed=opts.seed,
    )
    rewards = list(getattr(opts, "grpo_rewards", ("arithmetic", "arithmetic_steps")))
    trainer = GRPOTrainer(model, rewards, config, train_dataset=prompts, processing_class=tokenizer)
    trainer.train()
    copy_file(os.path.join(out, "loss_curve.png"), os.path.join(opts.output_dir, "grpo_loss_curve.png"))
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    results["grpo_reward_first_log"] = rewards[0] if rewards else None
    results["grpo_reward_last_log"] = rewards[-1] if rewards else None
    results["grpo_seconds_split"] = {k: round(v, 1) for k, v in trainer.timings.items()}
    return trainer.model
