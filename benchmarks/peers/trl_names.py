"""Regenerate tests/data/trl116_names.json: TRL's config fields and trainer constructor parameters per trainer.

Runs in a TRL virtual environment (posttrain never imports trl; the parity test reads the checked-in JSON):

    /path/to/trl-1.16-venv/bin/python benchmarks/peers/trl_names.py              # SFT ... AsyncGRPO from TRL 1.16
    /path/to/trl-1.12-venv/bin/python benchmarks/peers/trl_names.py --trl112     # adds BCO, PRM, PPO, Nash-MD,
                                                                                 # XPO, MiniLLM (TRL 1.12)

For each trainer it records the config fields TRL adds on top of `transformers.TrainingArguments` (with the
default's repr, or null where it comes from a factory), the TrainingArguments defaults TRL's config overrides,
and the parameter names of the trainer's ``__init__`` in order. Only names and defaults are recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "data", "trl116_names.json")

TRL116 = {
    "SFT": ("trl", "SFTConfig", "SFTTrainer"),
    "DPO": ("trl", "DPOConfig", "DPOTrainer"),
    "KTO": ("trl", "KTOConfig", "KTOTrainer"),
    "Reward": ("trl", "RewardConfig", "RewardTrainer"),
    "GRPO": ("trl", "GRPOConfig", "GRPOTrainer"),
    "RLOO": ("trl", "RLOOConfig", "RLOOTrainer"),
    "CPO": ("trl.experimental.cpo", "CPOConfig", "CPOTrainer"),
    "ORPO": ("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer"),
    "Distillation": ("trl", "DistillationConfig", "DistillationTrainer"),
    "OnlineDPO": ("trl.experimental.online_dpo", "OnlineDPOConfig", "OnlineDPOTrainer"),
    "GKD": ("trl.experimental.gkd", "GKDConfig", "GKDTrainer"),
    "AsyncGRPO": ("trl.experimental.async_grpo", "AsyncGRPOConfig", "AsyncGRPOTrainer"),
}
TRL112 = {  # trainers TRL 1.16 no longer ships under these names
    "BCO": ("trl.experimental.bco", "BCOConfig", "BCOTrainer"),
    "PRM": ("trl.experimental.prm", "PRMConfig", "PRMTrainer"),
    "PPO": ("trl.experimental.ppo", "PPOConfig", "PPOTrainer"),
    "NashMD": ("trl.experimental.nash_md", "NashMDConfig", "NashMDTrainer"),
    "XPO": ("trl.experimental.xpo", "XPOConfig", "XPOTrainer"),
    "MiniLLM": ("trl.experimental.minillm", "MiniLLMConfig", "MiniLLMTrainer"),
}


def _default(f: dataclasses.Field) -> str | None:
    return repr(f.default) if f.default is not dataclasses.MISSING else None


def describe(module: str, config: str, trainer: str) -> dict:
    from transformers import TrainingArguments

    base = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    mod = importlib.import_module(module)
    config_cls, trainer_cls = getattr(mod, config), getattr(mod, trainer)
    fields, overrides = {}, {}
    for f in dataclasses.fields(config_cls):
        if f.name not in base:
            fields[f.name] = _default(f)
        elif _default(f) != _default(base[f.name]):
            overrides[f.name] = _default(f)
    params = [p for p in inspect.signature(trainer_cls.__init__).parameters if p not in ("self", "args_", "kwargs")]
    return {"fields": fields, "overrides": overrides, "params": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trl112", action="store_true", help="add the trainers only TRL 1.12 has (run in a TRL 1.12 venv)")
    parser.add_argument("--out", default=OUT)
    opts = parser.parse_args()
    import trl

    data = json.load(open(opts.out)) if os.path.exists(opts.out) else {}
    specs = TRL112 if opts.trl112 else TRL116
    for name, spec in specs.items():
        entry = describe(*spec)
        entry["trl_version"] = trl.__version__
        data[name] = entry
        print(f"{name}: {len(entry['fields'])} fields, {len(entry['params'])} parameters (TRL {trl.__version__})")
    with open(opts.out, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.write("\n")


if __name__ == "__main__":
    main()
