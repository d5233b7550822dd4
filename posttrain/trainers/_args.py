"""What a trainer does with its `args` before anything else: make them the method's config, then seed.

Both follow TRL habits. A plain `transformers.TrainingArguments` (or another method's config) is accepted and
converted to the method's config class: every field the caller set is carried over and every other field
takes the method's default (a TrainingArguments default such as `learning_rate=5e-5` or
`remove_unused_columns=True` is not a choice the caller made, so it does not override the method's own).

Seeding comes next and before the model, its adapters or its heads are built: LoRA adapters and fresh
classification heads are initialized from the global RNG, so seeding only later (as `transformers.Trainer`
does in its own `__init__`) makes two runs at the same seed start from different adapters.
"""

from __future__ import annotations

import dataclasses
import logging
from enum import Enum
from typing import Any, TypeVar

from transformers import TrainingArguments
from transformers.trainer_pt_utils import AcceleratorConfig
from transformers.trainer_utils import enable_full_determinism, set_seed

logger = logging.getLogger(__name__)

__all__ = ["as_method_config", "explicit_fields", "seed_run"]

C = TypeVar("C", bound=TrainingArguments)


def _defaults_of(cls: type) -> dict[str, Any]:
    """`to_dict()` of a default instance of `cls` (post-init values, comparable with another instance's),
    falling back to plain `TrainingArguments` where `cls` cannot be built without arguments."""
    try:
        return cls().to_dict()
    except Exception:  # noqa: BLE001 - a user subclass with required fields or a validating __post_init__
        return TrainingArguments().to_dict()


def _plain(value: Any) -> Any:
    """A post-init value as the constructor accepts it again (enums to their values)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list) and value and isinstance(value[0], Enum):
        return [v.value for v in value]
    if isinstance(value, AcceleratorConfig):
        return value.to_dict()
    return value


def explicit_fields(args: TrainingArguments) -> dict[str, Any]:
    """The fields of `args` whose value differs from a default instance of its class: what the caller set.

    (A field set to exactly its default is indistinguishable from one left alone; either way the method's
    default applies, which is the point of converting.)"""
    values, defaults = args.to_dict(), _defaults_of(type(args))
    out = {}
    for name, shown in values.items():
        if name in defaults and shown == defaults[name]:
            continue
        out[name] = _plain(getattr(args, name))  # to_dict hides tokens; take the real value
    return out


def as_method_config(args: Any, config_class: type[C]) -> C:
    """`args` as an instance of `config_class`: None gives the defaults, an instance is returned as is, any
    other `TrainingArguments` is converted (the fields it set carried over, the others at the method's
    defaults). A set field the method's config does not have is an error, not silently dropped."""
    if args is None:
        return config_class()
    if isinstance(args, config_class):
        return args
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"args must be a {config_class.__name__} or a transformers.TrainingArguments, "
                        f"got {type(args).__name__}")
    carried = explicit_fields(args)
    known = {f.name for f in dataclasses.fields(config_class) if f.init}
    unknown = sorted(set(carried) - known)
    if unknown:
        raise ValueError(f"cannot convert {type(args).__name__} to {config_class.__name__}: it sets "
                         f"{', '.join(unknown)}, which {config_class.__name__} does not have")
    logger.info("converted %s to %s, carrying over %s", type(args).__name__, config_class.__name__,
                ", ".join(sorted(carried)) or "nothing")
    return config_class(**carried)


def seed_run(args: TrainingArguments) -> None:
    """Seed python, numpy and torch from `args.seed` as `transformers.Trainer` does (with
    `enable_full_determinism` when `args.full_determinism`), before anything random is built."""
    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)
