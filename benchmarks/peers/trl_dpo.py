"""TRL's DPOTrainer on what `dpo_bench.py --peer trl` exported: the peer figure, measured in the same run.

Runs in the peer's virtual environment (`bash benchmarks/peers/make_venv.sh`; posttrain never imports trl):

    benchmarks/peers/.venv-trl/bin/python benchmarks/peers/trl_dpo.py FOLDER [--threads N]

Same model folder, preference pairs, batch size and max length as posttrain's side, one epoch; everything else
is TRL's default (sigmoid loss, a reference copy of the model; on a CPU its `bf16=True` default runs as CPU
autocast, which needs `use_cpu=True`). Tokens count prompt+chosen and prompt+rejected once each, as
dpo_bench.py does. Prints real (non-pad) tokens/s over the epoch and peak RSS as JSON.
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
    parser.add_argument("folder")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = json.load(open(os.path.join(args.folder, "settings.json")))
    rows = [json.loads(line) for line in open(os.path.join(args.folder, "rows.jsonl"))]
    model = AutoModelForCausalLM.from_pretrained(os.path.join(args.folder, "model"), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.folder, "model"))
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-dpo-"), per_device_train_batch_size=settings["batch_size"],
        max_length=settings["max_length"], num_train_epochs=1,
        save_strategy="no", report_to="none", logging_steps=1000, disable_tqdm=True, use_cpu=True,
        **settings.get("peer_overrides", {}),
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    data = trainer.train_dataset
    real_tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in
                      zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"]))
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    print(json.dumps({
        "trl": __import__("trl").__version__,
        "real tokens": real_tokens,
        "epoch wall time (s)": round(wall, 2),
        "real tokens/s": real_tokens / wall,
        "peak RSS (GB)": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "bf16": config.bf16, "gradient_checkpointing": config.gradient_checkpointing,
        "torch threads": torch.get_num_threads(),
    }, indent=2))


if __name__ == "__main__":
    main()
