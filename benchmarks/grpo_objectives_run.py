"""Short GRPO runs of TRL 1.16's newer objectives on the built-in task: reward at the start and the end of each.

    PYTHONPATH=. .venv/bin/python benchmarks/grpo_objectives_run.py [--steps 24] [--only sapo,vespo]

Tiny model (tiny:nano), 2-digit arithmetic prompts, the digit-share reward of the tests (dense, so a few steps
show a trend), 8 completions per prompt, lr 2e-2. Prints one line per variant.
"""

from __future__ import annotations

import argparse
import math
import tempfile

import torch

VARIANTS = {  # num_iterations=2: the second pass is off-policy, where the objectives differ (at ratio 1 they agree)
    "dapo (baseline)": {},
    "dapo, 2 iterations": {"num_iterations": 2},
    "sapo, 2 iterations": {"loss_type": "sapo", "num_iterations": 2},
    "vespo, 2 iterations": {"loss_type": "vespo", "num_iterations": 2},
    "sequence IS level, 2 iterations": {"importance_sampling_level": "sequence", "loss_type": "grpo",
                                        "num_iterations": 2},
    "off_policy_mask 0.05, 2 iterations": {"off_policy_mask_threshold": 0.05, "num_iterations": 2},
    "top_entropy_quantile=0.2": {"top_entropy_quantile": 0.2},
    "adaptive entropy (target 7)": {"entropy_coef": 0.01, "use_adaptive_entropy": True, "entropy_target": 7.0},
    "beta=0.05 bias-corrected KL": {"beta": 0.05, "use_bias_correction_kl": True},
}


def digit_share(prompts, completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def run(name: str, overrides: dict, steps: int) -> tuple[float, float]:
    from posttrain import GRPOConfig, GRPOTrainer
    from posttrain.models import build_tiny
    from posttrain.tasks import ArithmeticTask

    model, tok = build_tiny("nano")
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, num_generations=8, per_device_train_batch_size=16, max_completion_length=8,
                          max_steps=steps, learning_rate=2e-2, logging_steps=max(steps // 4, 1), report_to="none",
                          save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant", seed=42, **overrides)
        trainer = GRPOTrainer(model, digit_share, args, train_dataset=ArithmeticTask(digits=2).prompt_only(200),
                              processing_class=tok)
        trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(x) for x in losses), (name, losses)
    return rewards[0], rewards[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--only", default=None)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    for name, overrides in VARIANTS.items():
        if opts.only and not any(key in name for key in opts.only.split(",")):
            continue
        first, last = run(name, overrides, opts.steps)
        print(f"{name:40s} reward {first:.3f} -> {last:.3f}", flush=True)


if __name__ == "__main__":
    main()
