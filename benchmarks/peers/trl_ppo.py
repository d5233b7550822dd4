"""TRL 1.12's PPOTrainer (the last TRL release that ships PPO, under trl.experimental.ppo) on ppo_bench.py's
model, reward model, prompts and settings: the peer figure for ppo_bench.py.

Runs in its own virtual environment with trl 1.12 installed (posttrain never imports trl):

    .venv/bin/python benchmarks/ppo_bench.py --export /tmp/ppo-peer
    /work/peers/trl112/bin/python benchmarks/peers/trl_ppo.py /tmp/ppo-peer [--steps 2] [--threads 1]

Same policy and reward model (tiny:bench, float32), the critic initialized from the reward model (as
posttrain's default), the same tokenized prompts, ``batch`` completions per PPO update of
``max_completion_length`` tokens, ``ppo_epochs`` epochs, one mini-batch, learning rate 1e-5, temperature 1.
TRL generates the full response length (no stop token), posttrain stops at EOS (a random model rarely does).
Prints completions/s over the measured updates and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="written by ppo_bench.py --export")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = json.load(open(os.path.join(args.folder, "settings.json")))
    rows = [json.loads(line) for line in open(os.path.join(args.folder, "prompts.jsonl"))]
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.folder, "model"))
    dataset = Dataset.from_dict({"input_ids": [tokenizer(r["prompt"])["input_ids"] for r in rows]})
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(args.folder, "model"), dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(os.path.join(args.folder, "model"), dtype=torch.float32)
    load_rm = lambda: AutoModelForSequenceClassification.from_pretrained(  # noqa: E731
        os.path.join(args.folder, "reward_model"), num_labels=1, dtype=torch.float32)
    batch = settings["batch"]
    config = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-ppo-"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=settings["ppo_epochs"],
        response_length=settings["max_completion_length"], total_episodes=batch * (args.warmup + args.steps),
        learning_rate=1e-5, temperature=1.0, local_rollout_forward_batch_size=batch, logging_steps=1000,
        save_strategy="no", report_to="none", use_cpu=True, bf16=False, num_sample_generations=0,
        missing_eos_penalty=None, stop_token="eos",
    )
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=load_rm(),
                         train_dataset=dataset, value_model=load_rm())
    marks: dict[str, float] = {}

    class Mark(TrainerCallback):
        def on_step_end(self, a: object, state: object, control: object, **kw: object) -> None:
            if state.global_step == args.warmup:
                marks["start"] = time.perf_counter()

    trainer.add_callback(Mark())
    trainer.train()
    wall = time.perf_counter() - marks["start"]
    print(json.dumps({
        "trl version": __import__("trl").__version__,
        "trl completions/s": args.steps * batch / wall,
        "seconds (measured updates)": round(wall, 2),
        "peak RSS (GiB)": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "torch threads": torch.get_num_threads(),
    }, indent=2))


if __name__ == "__main__":
    main()
