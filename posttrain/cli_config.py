"""The run file of `posttrain <method> --config run.yaml`: reading it, its `env:` block, and checking every value
against the type of the config field it sets, before anything runs.

- `--config run.yaml` and `--config=run.yaml` are the same flag; giving it twice is an error.
- YAML is read with YAML 1.2 scalars: only `true`/`false` are booleans, so `save_strategy: no` is the string
  "no" (YAML 1.1, PyYAML's default, reads it as False), and `1e-4` is a number (YAML 1.1: a string). A bool
  field still takes yes/no/on/off (YAML 1.1's booleans) and what `--flag yes` takes (transformers'
  `string_to_bool`: t/f, y/n, 1/0).
- Every value must fit its field's type as the matching flag would: `max_steps: 2.5` is an error naming the
  field, the value and the type, not a float that trains and then crashes. An enum field (`save_strategy`,
  `lr_scheduler_type`, ...) takes one of its choices; a list field takes a list (or one value, like a flag).
- `env:` is a mapping of environment variables set for the run, as TRL's `TrlParser` does: `posttrain`
  sets them in its own process (inherited by what it launches) before torch and transformers are imported,
  and logs each one. It is what the user asked for in the run file; posttrain itself reads none of them.

A dataclass may declare `yaml_field_types: ClassVar[dict[str, Any]]` for fields whose YAML form is richer
than their flag form (e.g. reward functions given as mappings).
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union

import yaml

__all__ = ["RunFile", "apply_env", "check_values", "load_yaml", "read_run_file", "split_config_flag"]


@dataclasses.dataclass
class RunFile:
    """A parsed run file: the field values and the `env:` block (strings)."""

    path: str | None = None
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    env: dict[str, str] = dataclasses.field(default_factory=dict)


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans (only true/false) and exponent floats without a dot."""


_BOOL_TAG, _FLOAT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    _FLOAT_TAG, re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(path: str) -> dict[str, Any]:
    """The mapping in YAML file `path`, read with YAML 1.2 scalars; SystemExit when missing or not a mapping."""
    if not os.path.exists(path):
        raise SystemExit(f"error: config file {path!r} does not exist")
    with open(path) as f:
        data = yaml.load(f, Loader=_Yaml12Loader) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path} must hold a mapping of field: value, got {type(data).__name__}")
    return data


def split_config_flag(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """(the path of `--config PATH` or `--config=PATH`, the other arguments)."""
    rest: list[str] = []
    paths: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config":
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise SystemExit("error: --config needs a file path")
            paths.append(args[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            if not arg[len("--config="):]:
                raise SystemExit("error: --config needs a file path")
            paths.append(arg[len("--config="):])
        else:
            rest.append(arg)
        i += 1
    if len(paths) > 1:
        raise SystemExit(f"error: --config given {len(paths)} times ({', '.join(paths)}); give one file")
    return (paths[0] if paths else None), rest


def _env_value(name: Any, value: Any, path: str) -> str:
    if not isinstance(name, str) or not name or "=" in name or "\0" in name:
        raise SystemExit(f"error: {path}: env: {name!r} is not an environment variable name")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise SystemExit(f"error: {path}: env: {name}: {value!r} is not a string or number")


def read_run_file(path: str | None) -> RunFile:
    """Read the run file at `path` (None: no file): its field values and its `env:` block."""
    if path is None:
        return RunFile()
    values = load_yaml(path)
    env = values.pop("env", None) or {}
    if not isinstance(env, dict):
        raise SystemExit(f"error: {path}: env must be a mapping of NAME: value, got {type(env).__name__}")
    return RunFile(path, values, {name: _env_value(name, value, path) for name, value in env.items()})


_SECRET = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


def apply_env(run_file: RunFile) -> None:
    """Set the run file's `env:` variables in this process (and so in every process it starts), logging each
    one on stderr (values of names that look secret are not printed). Like TRL, a variable already set in the
    shell is overridden; the log says so."""
    for name, value in run_file.env.items():
        before = os.environ.get(name)
        os.environ[name] = value
        shown = "<hidden>" if _SECRET.search(name) else value
        note = "" if before is None or before == value else " (overrides the value in the environment)"
        print(f"posttrain: env from {run_file.path}: {name}={shown}{note}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- type checks
class _Mismatch(Exception):
    pass


# transformers' string_to_bool (what `--flag yes` takes), plus YAML 1.1's on/off
_TRUE, _FALSE = ("yes", "true", "t", "y", "1", "on"), ("no", "false", "f", "n", "0", "off")
_NONE = type(None)


def _is_union(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    return origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType)


def _is_choice(hint: Any) -> bool:
    return typing.get_origin(hint) is Literal or (isinstance(hint, type) and issubclass(hint, enum.Enum))


def _choices(hint: Any) -> list[Any]:
    return list(typing.get_args(hint)) if typing.get_origin(hint) is Literal else [m.value for m in hint]


def _union_members(hint: Any) -> list[Any]:
    members = list(typing.get_args(hint))
    if str in members and any(_is_choice(m) for m in members):
        members.remove(str)  # as the flag does: `Enum | str` takes the enum's choices
    return members


def describe(hint: Any) -> str:
    """A type hint in words, for error messages."""
    if _is_union(hint):
        return " or ".join(dict.fromkeys(describe(m) for m in _union_members(hint)))
    if _is_choice(hint):
        return "one of " + ", ".join(repr(c) for c in _choices(hint))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        return f"a list of {describe(args[0])} values" if args else "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
            _NONE: "null"}.get(hint, getattr(hint, "__name__", str(hint)))


def _coerce_one(value: Any, hint: Any, strict: bool) -> Any:
    """`value` as type `hint` (not a union); `strict` accepts only values already of that type."""
    if hint is Any or hint is object:
        return value
    if _is_choice(hint):
        choices = _choices(hint)
        if isinstance(value, enum.Enum):
            value = value.value
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        raise _Mismatch
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        item = args[0] if args else Any
        if isinstance(value, (list, tuple)):
            return [_coerce(v, item) for v in value]
        if strict or isinstance(value, dict):
            raise _Mismatch
        return [_coerce(value, item)]  # one value, as `--field value` gives
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        if len(args) == 2:
            return {k: _coerce(v, args[1]) for k, v in value.items()}
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if not strict and isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if not strict:
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                try:
                    return int(value.strip())
                except ValueError:
                    pass
        raise _Mismatch
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if not strict and isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        if not strict and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    if hint is _NONE:
        if value is None:
            return None
        raise _Mismatch
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    if isinstance(hint, type) and isinstance(value, (bool, int, float, str)):
        raise _Mismatch
    return value  # a type YAML cannot spell (a config object): the config's own checks see it


def _coerce(value: Any, hint: Any) -> Any:
    """`value` as a value of type hint `hint`, converted as the flag form would convert it; `_Mismatch` else."""
    members = _union_members(hint) if _is_union(hint) else [hint]
    if value is None:
        if _NONE in members or hint is Any:
            return None
        raise _Mismatch
    for strict in (True, False):
        for member in members:
            if member is _NONE:
                continue
            try:
                return _coerce_one(value, member, strict)
            except _Mismatch:
                pass
    raise _Mismatch


def _aliases(field: dataclasses.Field) -> list[str]:
    aliases = field.metadata.get("aliases", [])
    return [a.lstrip("-").replace("-", "_") for a in ([aliases] if isinstance(aliases, str) else aliases)]


def check_values(values: dict[str, Any], classes: Sequence[type], source: str, command: str) -> dict[str, Any]:
    """The run file's `values` keyed by field name and converted to each field's type; SystemExit listing every
    unknown field (or alias given twice) and every value that does not fit its field's type."""
    fields: dict[str, tuple[type, Any]] = {}
    alias_of: dict[str, str] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        hints.update(getattr(cls, "yaml_field_types", {}) or {})
        for f in dataclasses.fields(cls):
            fields[f.name] = (cls, hints[f.name])
            for alias in _aliases(f):
                alias_of[alias] = f.name
    unknown = sorted(k for k in values if k not in fields and k not in alias_of)
    if unknown:
        raise SystemExit(f"error: {source}: unknown field(s) {', '.join(map(str, unknown))}; "
                         f"see `posttrain {command} --help` for the valid ones")
    checked: dict[str, Any] = {}
    errors: list[str] = []
    for key, value in values.items():
        name = alias_of.get(key, key)
        if name in checked:
            errors.append(f"{name} is given twice ({key} is another name for it)")
            continue
        cls, hint = fields[name]
        try:
            checked[name] = _coerce(value, hint)
        except _Mismatch:
            kind = "null" if value is None else type(value).__name__
            errors.append(f"{key}: {value!r} ({kind}) is not {describe(hint)} (field {name} of {cls.__name__})")
    if errors:
        raise SystemExit(f"error: {source}: " + (errors[0] if len(errors) == 1 else
                                                 f"{len(errors)} bad values:" + "".join(f"\n  {e}" for e in errors)))
    return checked
