"""Seeded reference runs of the online loop: GRPO and RLOO for 10 steps on a tiny model.

`tests/data/online_reference_runs.json` holds what these runs logged (loss, reward, KL per step) with the
online loop as it was before it became an explicit pipeline; `test_online_reference_runs.py` checks that
today's loop logs the same, so a redesign of the loop cannot change what a run computes.
Regenerate (only when a change of numbers is intended, and say why in the commit):
``python tests/reference_runs.py --write``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from posttrain.models import build_tiny
from posttrain.tasks import ArithmeticTask

PATH = Path(__file__).parent / "data" / "online_reference_runs.json"
KEYS = ("loss", "reward", "kl", "reward_std", "entropy")
#: what today's loop must reproduce; reward_std changed meaning on purpose (TRL's: the std over the whole
#: batch, no longer the mean of the groups' stds), so it is recorded but not compared
COMPARED = ("loss", "reward", "kl", "entropy")
#: metrics renamed since the recording: (run, recorded name) -> today's name of the same quantity. RLOO's
#: "kl" now has TRL's meaning (per-token mean); its former value, the mean sequence KL, is "kl/sequence_mean"
RENAMED = {("rloo", "kl"): "kl/sequence_mean"}


def text_length(prompts, completions, **kwargs):
    return [len(c) / 10 for c in completions]


def _common(**kw):
    base = dict(output_dir="/tmp/posttrain-reference-run", num_generations=4, per_device_train_batch_size=16,
                max_completion_length=8, max_steps=10, logging_steps=1, report_to="none", learning_rate=1e-2,
                log_completions=False, save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant",
                seed=7)
    base.update(kw)
    return base


def run(name: str) -> list[dict]:
    """One reference run; returns the logged values of `KEYS` per step."""
    torch.manual_seed(0)
    model, tok = build_tiny("nano")
    data = ArithmeticTask(digits=2).prompt_only(96)
    if name == "grpo":
        from posttrain.trainers.grpo import GRPOConfig, GRPOTrainer
        # recorded with the plain k3 KL: TRL 1.16's bias-corrected KL (now the default) changes its gradient
        args = GRPOConfig(**_common(beta=0.04, num_iterations=2, loss_type="dapo", use_bias_correction_kl=False))
        trainer = GRPOTrainer(model, text_length, args, train_dataset=data, processing_class=tok)
    elif name == "grpo_skip":
        from posttrain.trainers.grpo import GRPOConfig, GRPOTrainer
        args = GRPOConfig(**_common(beta=0.0, loss_type="grpo"))
        trainer = GRPOTrainer(model, text_length, args, train_dataset=data, processing_class=tok)
    elif name == "rloo":
        from posttrain.trainers.rloo import RLOOConfig, RLOOTrainer
        args = RLOOConfig(**_common(beta=0.05))
        trainer = RLOOTrainer(model, text_length, args, train_dataset=data, processing_class=tok)
    else:
        raise ValueError(name)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.train()
    finally:
        torch.set_num_threads(before)
    keys = KEYS + tuple(new for (run_name, _), new in RENAMED.items() if run_name == name)
    return [{k: h[k] for k in keys if k in h} for h in trainer.state.log_history if "loss" in h]


NAMES = ("grpo", "grpo_skip", "rloo")

if __name__ == "__main__":
    if "--write" in sys.argv:
        PATH.write_text(json.dumps({n: run(n) for n in NAMES}, indent=1) + "\n")
        print(f"wrote {PATH}")
    else:
        for n in NAMES:
            print(n, run(n))
