"""TRL 1.16's DistillationTrainer and experimental GKDTrainer on distill_bench.py's models, data and settings.

Runs in its own virtual environment with `trl` installed (posttrain never imports trl); distill_bench.py
exports the student, the teacher and the rows, then calls this script with the peer's Python:

    /path/to/trl-venv/bin/python benchmarks/peers/trl_distill.py FOLDER --mode gkd|distill [--threads 1]

Prints one JSON object: the measured seconds, the per-step log (TRL's completion lengths for distill) and
peak RSS. Settings not in settings.json are TRL's defaults, except bf16=False, use_cpu=True and
gradient_checkpointing=False (posttrain's benchmark runs without checkpointing too).
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
    parser.add_argument("--mode", choices=("gkd", "distill"), required=True)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    if args.threads:
        torch.set_num_threads(args.threads)
    s = json.load(open(os.path.join(args.folder, "settings.json")))
    rows = [json.loads(line) for line in open(os.path.join(args.folder, "rows.jsonl"))]
    student = AutoModelForCausalLM.from_pretrained(os.path.join(args.folder, "student"), dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(os.path.join(args.folder, "teacher"), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.folder, "student"))
    common = dict(output_dir=tempfile.mkdtemp(prefix=f"trl-{args.mode}-"), per_device_train_batch_size=s["batch"],
                  max_steps=s["warmup"] + s["steps"], learning_rate=1e-5, logging_steps=1, save_strategy="no",
                  report_to="none", disable_tqdm=True, use_cpu=True, bf16=False, gradient_checkpointing=False,
                  temperature=s["temperature"], beta=s["beta"])
    if args.mode == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        config = GKDConfig(lmbda=s["lmbda"], max_new_tokens=s["max_completion_length"], **common)
        data = Dataset.from_list([{"messages": r["prompt"] + r["completion"]} for r in rows])
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data,
                             processing_class=tokenizer)
    else:
        from trl import DistillationConfig, DistillationTrainer

        config = DistillationConfig(max_completion_length=s["max_completion_length"], **common)
        data = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data,
                                      processing_class=tokenizer)
    marks: dict[str, float] = {}

    class Mark(TrainerCallback):
        def on_step_end(self, a: object, state: object, control: object, **kw: object) -> None:
            if state.global_step == s["warmup"]:
                marks["start"] = time.perf_counter()

    trainer.add_callback(Mark())
    trainer.train()
    wall = time.perf_counter() - marks["start"]
    logs = [h for h in trainer.state.log_history if "loss" in h][s["warmup"]:]
    print(json.dumps({"seconds": wall, "logs": logs, "torch threads": torch.get_num_threads(),
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    main()
