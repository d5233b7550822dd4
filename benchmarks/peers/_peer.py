"""What the TRL peer scripts share: read a folder exported by a posttrain benchmark, time `trainer.train()`.

Imported by the scripts next to it (they run in the peer's own venv, where posttrain is not installed)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from typing import Any


def exported(description: str) -> tuple[argparse.Namespace, dict, list[dict], Any, Any]:
    """Parse ``FOLDER [--threads N]``; return the options, the settings, the rows, the model and the tokenizer."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("folder")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = json.load(open(os.path.join(args.folder, "settings.json")))
    rows = [json.loads(line) for line in open(os.path.join(args.folder, "rows.jsonl"))]
    model = AutoModelForCausalLM.from_pretrained(os.path.join(args.folder, "model"), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.folder, "model"))
    return args, settings, rows, model, tokenizer


def time_epoch(trainer: Any, real_tokens: int, config: Any) -> None:
    """Train one epoch and print real tokens/s and peak RSS as JSON (the benchmark reads the last object)."""
    import torch
    import trl

    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    print(json.dumps({
        "trl": trl.__version__, "real tokens": real_tokens, "epoch wall time (s)": round(wall, 2),
        "real tokens/s": real_tokens / wall,
        "peak RSS (GB)": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "bf16": config.bf16, "gradient_checkpointing": config.gradient_checkpointing,
        "torch threads": torch.get_num_threads(),
    }, indent=2))


def peft_config(settings: dict) -> Any:
    """The ``peft.LoraConfig`` posttrain's side trained (``settings["lora"]``), or None for a full fine-tune."""
    if not settings.get("lora"):
        return None
    from peft import LoraConfig

    return LoraConfig(**settings["lora"])
