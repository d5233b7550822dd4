"""Run by tests/test_trackers.py in a fresh interpreter (the trackers read their folders from the environment
at import): a few GRPO steps on a tiny model with ``report_to`` set to the trackers named on the command line,
with a KL term and the completions table, so the test can read the written runs back.

    TRACKIO_DIR=... TENSORBOARD_LOGGING_DIR=... WANDB_MODE=offline WANDB_DIR=... python tests/scripts/tracked_grpo.py OUT trackio,tensorboard,wandb
"""

import sys

import torch

from posttrain import GRPOConfig, GRPOTrainer
from posttrain.models import build_tiny
from posttrain.tasks import ArithmeticTask


def main(out: str, trackers: str) -> None:
    torch.set_num_threads(1)
    model, tok = build_tiny("nano")
    args = GRPOConfig(output_dir=out, num_generations=4, per_device_train_batch_size=8, max_completion_length=8,
                      max_steps=2, logging_steps=1, learning_rate=1e-3, beta=0.04, seed=0, save_strategy="no",
                      disable_tqdm=True, report_to=trackers.split(","),
                      project="posttrain-test", run_name="tracked-grpo", log_completions=True,
                      log_completions_steps=1, num_completions_to_print=2)
    trainer = GRPOTrainer(model, ["arithmetic_format", "arithmetic"], args,
                          train_dataset=ArithmeticTask(digits=2).prompt_only(32), processing_class=tok)
    trainer.train()
    if "wandb" in args.report_to:
        import wandb

        wandb.finish()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
