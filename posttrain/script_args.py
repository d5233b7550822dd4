"""Arguments every `posttrain <method>` command takes besides the method's config: the model, the data and
the PEFT adapter. Kept apart from the configs so that the Python API stays TRL-shaped (model and datasets are
trainer arguments, not config fields)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import datasets

logger = logging.getLogger(__name__)

__all__ = ["ScriptArguments", "load_script_datasets", "peft_config_from_args"]


@dataclass
class ScriptArguments:
    """Model, data and adapter options of the command line."""

    # in YAML a `datasets:` entry may be a mapping of DatasetSource fields (checked by posttrain.data.mixtures)
    yaml_field_types: ClassVar[dict[str, Any]] = {"datasets": list[str | dict] | None}

    model_name_or_path: str = field(
        default="tiny:small",
        metadata={"help": "Model to train: tiny:<spec> (built locally), a local folder or a hub name."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer, when it differs from the model's."}
    )
    dataset_name: str = field(
        default="task:arithmetic",
        metadata={"help": "Training data: task:arithmetic[:<format>[:chat]] (built-in, generated locally), a local "
                  ".json/.jsonl/.parquet/.csv file or folder, or a hub dataset name."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(
        default="auto", metadata={"help": "Split to evaluate on. 'auto' (default): the data's 'test' split when it has "
                                  "one (a folder with test.jsonl, a hub dataset's test split, the built-in task's "
                                  "held-out rows), else no evaluation. A named split must exist. 'none' (null in "
                                  "YAML): no evaluation."}
    )
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "A separate evaluation file, folder or hub dataset: its dataset_test_split, "
                                "by default its 'test' split or, with one split only (a single file), all of it."}
    )
    datasets: list[str] | None = field(
        default=None, metadata={"help": "A mixture of datasets, in place of dataset_name: in YAML a list of "
                                "{path, name, split, columns, weight | count} entries (see posttrain.data.mixtures); "
                                "as a flag, paths or JSON objects of those fields. Drawn with dataset_mixture_seed; "
                                "evaluation comes from eval_dataset_name."})
    dataset_mixture_seed: int = field(default=0, metadata={"help": "Seed of the mixture's draws and interleaving."})
    dataset_streaming: bool = field(
        default=False, metadata={"help": "Stream the training data (an IterableDataset, read as training goes: "
                                 "needs max_steps) instead of loading it whole."})
    task_digits: int = field(default=2, metadata={"help": "Built-in arithmetic task: digits per operand."})
    task_train_size: int = field(default=2000, metadata={"help": "Built-in task: training rows."})
    task_test_size: int = field(default=200, metadata={"help": "Built-in task: held-out rows."})
    task_errors: str = field(
        default="sum", metadata={"help": "Built-in task: how wrong solutions go wrong, 'sum' (a column sum off by "
                                 "1 or 2) or 'carry' (a dropped or invented carry, which reward models learn fast)."}
    )
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str | None = field(
        default=None, metadata={"help": "Comma-separated module names for LoRA; default: all linear layers."}
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load the base model in 4 bit (needs bitsandbytes and a GPU)."})
    merge_adapters: bool = field(default=False, metadata={"help": "After training, also save the adapter merged into the base weights."})


def _task_datasets(name: str, args: ScriptArguments, default_format: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    from .tasks import ArithmeticTask

    parts = name.split(":")
    if len(parts) < 2 or parts[1] != "arithmetic":
        raise ValueError(f"unknown built-in task {name!r}; available: task:arithmetic[:<format>[:chat]]")
    fmt = parts[2] if len(parts) > 2 and parts[2] else default_format
    conversational = len(parts) > 3 and parts[3] in ("chat", "conversational")
    task = ArithmeticTask(digits=args.task_digits, seed=0, conversational=conversational, errors=args.task_errors)
    splits = task.split(args.task_train_size, args.task_test_size, train_format=fmt, test_format=fmt)
    return splits["train"], splits["test"]


def _eval_off(split: str | None) -> bool:
    return split is None or split.strip().lower() in ("", "none", "null")


def load_script_datasets(
    args: ScriptArguments, default_format: str = "prompt_completion"
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Training and (optional) evaluation datasets named by the command-line arguments.

    The evaluation set is the split `dataset_test_split` names, never the training rows: with the default
    'auto' it is the data's `test` split when there is one and otherwise there is no evaluation (logged); a
    split that is named but missing, or that is the training split, is a ValueError naming the splits the data
    has.
    """
    from .data import held_out_split, load_any, load_held_out, split_names

    if args.datasets:
        return _mixture_datasets(args)
    test_split = None if _eval_off(args.dataset_test_split) else args.dataset_test_split
    auto = test_split == "auto"
    if args.dataset_name.startswith("task:"):
        train, test = _task_datasets(args.dataset_name, args, default_format)
        if test_split not in (None, "auto", "test") and not args.eval_dataset_name:
            raise ValueError(f"dataset_test_split={test_split!r}: the built-in task {args.dataset_name!r} has the "
                             "splits ['test', 'train']")
        if args.dataset_train_split != "train":
            raise ValueError(f"dataset_train_split={args.dataset_train_split!r}: the built-in task "
                             f"{args.dataset_name!r} has the splits ['test', 'train']")
    else:
        kwargs: dict[str, Any] = {"name": args.dataset_config} if args.dataset_config else {}
        train = load_any(args.dataset_name, split=args.dataset_train_split, **kwargs)
        test = None
        if test_split is not None and not args.eval_dataset_name:
            if test_split == args.dataset_train_split:
                raise ValueError(f"dataset_test_split={test_split!r} is the training split: the evaluation would "
                                 "score the training rows (set dataset_test_split to another split, or none)")
            if not auto:
                test = load_any(args.dataset_name, split=test_split, **kwargs)
            else:
                names = split_names(args.dataset_name)
                if names is None:  # a hub dataset: its splits are known once asked for
                    try:
                        test = load_any(args.dataset_name, split="test", **kwargs)
                    except ValueError:
                        test = None
                elif "test" in names and args.dataset_train_split != "test":
                    test = load_any(args.dataset_name, split="test", **kwargs)
                if test is None:
                    logger.warning("%s has no 'test' split%s: training without evaluation (name one with "
                                   "dataset_test_split, or give eval_dataset_name)", args.dataset_name,
                                   f" (its splits: {names})" if names else "")
    if args.dataset_streaming:
        if args.dataset_name.startswith("task:"):
            train = train.to_iterable_dataset()
        else:
            train = load_any(args.dataset_name, split=args.dataset_train_split, streaming=True, **kwargs)
    if test_split is None:
        if args.eval_dataset_name:
            logger.warning("dataset_test_split is none: eval_dataset_name %r is not used", args.eval_dataset_name)
        return train, None
    if args.eval_dataset_name:
        split = held_out_split(args.eval_dataset_name, None if auto else test_split)
        if _same_source(args.eval_dataset_name, args.dataset_name) and split == args.dataset_train_split:
            raise ValueError(f"eval_dataset_name {args.eval_dataset_name!r} split {split!r} is the training data: "
                             "the evaluation would score the training rows")
        test = load_held_out(args.eval_dataset_name, split=split)
    return train, test


def _mixture_datasets(args: ScriptArguments) -> tuple[Any, datasets.Dataset | None]:
    """The `datasets:` mixture (train) and eval_dataset_name's held-out rows (the evaluation, if given)."""
    import json

    from .data import load_held_out
    from .data.mixtures import mix_datasets

    sources = [json.loads(s) if isinstance(s, str) and s.lstrip().startswith("{") else s for s in args.datasets]
    if args.dataset_name != "task:arithmetic":
        logger.warning("datasets (a mixture) is given: dataset_name %r is not used", args.dataset_name)
    train = mix_datasets(sources, args.dataset_mixture_seed, streaming=args.dataset_streaming)
    if args.eval_dataset_name and not _eval_off(args.dataset_test_split):
        split = None if args.dataset_test_split == "auto" else args.dataset_test_split
        return train, load_held_out(args.eval_dataset_name, split=split)
    logger.info("a dataset mixture trains without evaluation unless eval_dataset_name is given")
    return train, None


def _same_source(a: str, b: str) -> bool:
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def peft_config_from_args(args: ScriptArguments, task_type: str = "CAUSAL_LM") -> Any:
    """A `peft.LoraConfig` from the command-line arguments, or None without `--use_peft`."""
    if not args.use_peft:
        return None
    from peft import LoraConfig

    targets: Any = [m.strip() for m in args.lora_target_modules.split(",")] if args.lora_target_modules else "all-linear"
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, task_type=task_type)
    if args.load_in_4bit:
        config.load_in_4bit = True  # read by posttrain.models.apply_peft / load_model
    return config
