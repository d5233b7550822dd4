"""TRL 1.16's experimental OnlineDPOTrainer on online_dpo_bench.py's model, prompts and settings (the peer).

Runs in TRL's own virtual environment (posttrain never imports trl), on what
``online_dpo_bench.py --export FOLDER`` wrote:

    /work/peers/trl116/bin/python benchmarks/peers/trl_online_dpo.py FOLDER [--steps 4] [--threads 1]

TRL's per_device_train_batch_size counts prompts (each gets 2 completions), so it is half of posttrain's
completions per step; same 64 new tokens, learning rate 1e-5, reward functions (exact answer + share of
digits), float32 on CPU; everything else TRL's default. Prints completions/s and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

from trl_grpo import accuracy, digit_share  # the same rewards as the GRPO peer (this script's folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = json.load(open(os.path.join(args.folder, "settings.json")))
    rows = [json.loads(line) for line in open(os.path.join(args.folder, "prompts.jsonl"))]
    model = AutoModelForCausalLM.from_pretrained(os.path.join(args.folder, "model"), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.folder, "model"))
    config = OnlineDPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-odpo-"), per_device_train_batch_size=settings["batch"] // 2,
        max_new_tokens=settings["max_new_tokens"], max_steps=args.warmup + args.steps, learning_rate=1e-5,
        logging_steps=1000, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, bf16=False)
    trainer = OnlineDPOTrainer(model=model, reward_funcs=[accuracy, digit_share], args=config,
                               train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    marks: dict[str, float] = {}

    class Mark(TrainerCallback):
        def on_step_end(self, a: object, state: object, control: object, **kw: object) -> None:
            if state.global_step == args.warmup:
                marks["start"] = time.perf_counter()

    trainer.add_callback(Mark())
    trainer.train()
    wall = time.perf_counter() - marks["start"]
    print(json.dumps({
        "trl completions/s": args.steps * settings["batch"] / wall,
        "seconds (measured steps)": round(wall, 2),
        "peak RSS (GiB)": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "torch threads": torch.get_num_threads(),
    }, indent=2))


if __name__ == "__main__":
    main()
