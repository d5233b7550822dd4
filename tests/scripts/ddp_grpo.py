"""Run by tests/test_multiprocess_online.py under `torchrun --nproc_per_node 2` (CPU, gloo).

Process 0's reward varies within every group; process 1's is constant, so all of its completions have
advantage 0 and take the zero-advantage path while process 0's do not. Writes, per process, the final
weights' checksum, the rewards it saw and what the trainer logged.
"""

import json
import os
import sys

import torch

from posttrain import GRPOConfig, GRPOTrainer
from posttrain.models import build_tiny
from posttrain.tasks import ArithmeticTask

RANK = int(os.environ["RANK"])
SEEN: list[float] = []


def reward(prompts, completions, **kwargs):
    values = [len(c) / 10 for c in completions] if RANK == 0 else [1.0] * len(completions)
    SEEN.extend(values)
    return values


def main(out: str, skip: str) -> None:
    torch.set_num_threads(1)
    model, tok = build_tiny("nano")
    args = GRPOConfig(output_dir=f"{out}/run", num_generations=4, per_device_train_batch_size=8,
                      max_completion_length=6, max_steps=3, logging_steps=1, report_to="none", learning_rate=1e-2,
                      log_completions=False, save_strategy="no", disable_tqdm=True, seed=3,
                      skip_zero_advantage_backward=skip == "skip", ddp_timeout=60)
    trainer = GRPOTrainer(model, reward, args, train_dataset=ArithmeticTask(digits=2).prompt_only(64),
                          processing_class=tok)
    trainer.train()
    checksum = float(sum(p.double().sum() for p in trainer.model.parameters()))
    logs = [h for h in trainer.state.log_history if "reward" in h]
    with open(f"{out}/rank{RANK}.json", "w") as f:
        json.dump({"checksum": checksum, "seen": SEEN, "logs": logs,
                   "skipped": trainer.counts["completions_without_backward"]}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
