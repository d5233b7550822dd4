"""The method table: each trainer module registers its config and trainer here, and the CLI turns every
entry into a `posttrain <name>` command. Nothing in the CLI knows any method by name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["MethodSpec", "register_method", "get_method", "list_methods"]


@dataclass
class MethodSpec:
    """What the CLI needs to run one method.

    `extra_args` are additional dataclasses parsed from the same YAML and flags (for example the reward
    functions of GRPO); `trainer_kwargs(script, *extras, config)` turns the parsed extra dataclasses (and the
    parsed config, last) into keyword arguments for the trainer (beyond model, args, datasets, tokenizer and PEFT config, which the CLI always passes).
    `dataset_split` is the data format the built-in task should produce for this method.
    """

    name: str
    config_class: type
    trainer_class: type
    help: str = ""
    extra_args: tuple[type, ...] = ()
    trainer_kwargs: Callable[..., dict[str, Any]] | None = None
    task_format: str = "prompt_completion"
    metadata: dict[str, Any] = field(default_factory=dict)


_METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    config_class: type,
    trainer_class: type,
    help: str = "",
    extra_args: tuple[type, ...] = (),
    trainer_kwargs: Callable[..., dict[str, Any]] | None = None,
    task_format: str = "prompt_completion",
) -> MethodSpec:
    """Register a method so that `posttrain <name>` runs it. Re-registering a name replaces it."""
    spec = MethodSpec(name, config_class, trainer_class, help, tuple(extra_args), trainer_kwargs, task_format)
    _METHODS[name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The registered method called `name`, or a KeyError that lists the known ones."""
    if name not in _METHODS:
        known = ", ".join(sorted(_METHODS)) or "(none)"
        raise KeyError(f"unknown method {name!r}; known methods: {known}")
    return _METHODS[name]


def list_methods() -> list[MethodSpec]:
    """All registered methods, sorted by name."""
    return [_METHODS[k] for k in sorted(_METHODS)]
