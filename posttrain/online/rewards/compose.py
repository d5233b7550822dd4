"""Reward functions for online RL: resolution by name, path or object, and weighted composition.

The contract (docs/internals.md): ``f(prompts, completions, completion_ids, **dataset_columns) ->
list[float | None]``, one value per completion, ``None`` meaning "not applicable to this sample".
Functions may be ``async``; a `RewardComposer` awaits all of them concurrently in one event loop.
A reward model (a sequence-classification model, its path, or a scorer object with a ``score`` method)
is accepted wherever a function is (see `posttrain.online.rewards.scoring`).

Samples where *every* function returned ``None`` have a total of 0.0 but are marked invalid
(`RewardBatch.valid`): as in TRL 1.16 they are left out of the group statistics and get advantage 0. The
composer counts them (``rewards/all_none`` in the metrics) and warns once; ``all_none="error"`` raises instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import inspect
import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ...data.messages import completion_text
from .builtin import builtin_factory, builtin_names

logger = logging.getLogger(__name__)

RewardFunc = Callable[..., Any]


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned something invalid; the message names it and the sample."""


def reward_func_name(func: Any) -> str:
    """A readable name for metrics and errors: ``__name__``, a model's ``name_or_path`` or the class."""
    name = getattr(func, "reward_name", None) or getattr(func, "__name__", None)
    if name is None:
        config = getattr(func, "config", None)
        name = getattr(config, "_name_or_path", None) or type(func).__name__
    return str(name).rstrip("/").split("/")[-1]


def _import_object(spec: str) -> Any:
    """``package.module:attr`` or ``package.module.attr`` -> the object; ImportError when not found."""
    if ":" in spec:
        module_name, attr = spec.split(":", 1)
    elif "." in spec:
        module_name, attr = spec.rsplit(".", 1)
    else:
        raise ImportError(f"{spec!r} is not a dotted import path")
    module = importlib.import_module(module_name)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _call_factory(factory: Callable, kwargs: dict[str, Any]) -> RewardFunc:
    """Call a built-in factory with the keyword arguments it accepts."""
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return factory(**kwargs)
    return factory(**{k: v for k, v in kwargs.items() if k in params})


def resolve_reward_func(spec: Any, *, processing_class: Any = None, **context: Any) -> RewardFunc:
    """Turn a reward spec into a callable following the reward contract.

    ``spec`` is one of: a callable (used as is); a built-in name (``accuracy``, ``format``, ``length``,
    ``soft_overlong``, ``arithmetic``, ``arithmetic_format``, ``arithmetic_steps``); a dict ``{"name": <built-in or import path>, **kwargs}`` for a
    configured built-in; an import path ``package.module:func`` or ``package.module.func``; a
    sequence-classification ``PreTrainedModel``, a scorer object, or a model path/name (loaded as a
    reward model, scored with ``processing_class`` or its own tokenizer). ``context`` (e.g.
    ``max_completion_length``) fills built-in factory arguments that the spec leaves out.
    """
    from . import scoring as reward_scoring

    if isinstance(spec, dict):
        options = dict(spec)
        name = options.pop("name", None)
        if name is None:
            raise ValueError(f"a reward given as a mapping needs a 'name' key, got {spec!r}")
        factory = builtin_factory(name)
        if factory is not None:
            return _call_factory(factory, {**context, **options})
        obj = _import_object(name)
        if reward_scoring.is_reward_model(obj) and not inspect.isclass(obj):
            return obj  # an object that scores already; a class (RewardModelScorer) is built from the options
        return obj(**options)
    if isinstance(spec, str):
        factory = builtin_factory(spec)
        if factory is not None:
            return _call_factory(factory, context)
        try:
            obj = _import_object(spec)
        except ImportError as import_error:
            if reward_scoring.looks_like_model(spec):
                return reward_scoring.model_reward(spec, processing_class)
            raise ValueError(
                f"cannot resolve reward {spec!r}: not a built-in ({', '.join(builtin_names())}), "
                f"not an importable 'package.module:func' ({import_error}), and not a model path"
            ) from None
        return resolve_reward_func(obj, processing_class=processing_class, **context)
    if reward_scoring.is_reward_model(spec):
        return reward_scoring.model_reward(spec, processing_class)
    if callable(spec):
        return spec
    raise TypeError(f"a reward must be a callable, a name, an import path or a reward model, got {type(spec)}")


def _is_async(func: Any) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None))


def _accepted_kwargs(func: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pass every column to functions with ``**kwargs``; only the named ones to the others."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _run_coroutine(coro: Any) -> Any:
    """Run a coroutine to completion, also from a thread that already runs an event loop (notebooks)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _short(value: Any, limit: int = 300) -> str:
    text = completion_text(value) if not isinstance(value, str) else value
    text = repr(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class RewardBatch:
    """Rewards of one batch: ``per_func [N, F]`` (NaN where a function returned None) and ``total [N]``.

    ``valid [N]`` marks the completions at least one function scored; the others (every function returned
    None) have ``total`` 0, are left out of the reward statistics and get advantage 0, as in TRL.
    """

    names: list[str]
    per_func: torch.Tensor
    total: torch.Tensor
    all_none: int = 0
    weights: list[float] = field(default_factory=list)

    @property
    def valid(self) -> torch.Tensor:
        return ~torch.isnan(self.per_func).all(dim=1) if self.per_func.shape[1] else torch.ones(len(self.total), dtype=torch.bool)

    def select(self, index: list[int]) -> "RewardBatch":
        idx = torch.tensor(index, dtype=torch.long)
        per_func, total = self.per_func[idx], self.total[idx]
        all_none = int(torch.isnan(per_func).all(dim=1).sum()) if per_func.shape[1] else 0
        return RewardBatch(self.names, per_func, total, all_none, list(self.weights))

    @classmethod
    def concat(cls, parts: list["RewardBatch"]) -> "RewardBatch":
        return cls(parts[0].names, torch.cat([p.per_func for p in parts]), torch.cat([p.total for p in parts]),
                   sum(p.all_none for p in parts), list(parts[0].weights))

    def metrics(self) -> dict[str, float]:
        """Mean and std (over applicable samples) of each function and of the weighted total (TRL's
        ``reward`` and ``reward_std``: over every scored completion of the batch)."""
        out: dict[str, float] = {}
        for j, name in enumerate(self.names):
            col = self.per_func[:, j]
            col = col[~torch.isnan(col)]
            out[f"rewards/{name}/mean"] = col.mean().item() if col.numel() else float("nan")
            out[f"rewards/{name}/std"] = col.std().item() if col.numel() > 1 else 0.0
        total = self.total[self.valid]
        out["reward"] = total.mean().item() if total.numel() else float("nan")
        out["reward_std"] = total.std().item() if total.numel() > 1 else 0.0
        out["rewards/all_none"] = float(self.all_none)
        return out


class RewardComposer:
    """Runs several reward functions on a batch and combines them: ``total = sum_j w_j * r_j``.

    ``None`` values are skipped in the sum (NaN-aware). A function that raises, returns the wrong number
    of values, a non-number, NaN or infinity stops training with `RewardFunctionError` naming the
    function and the failing sample (index, prompt, completion); when a function raises on a batch, it
    is re-run one sample at a time to find the sample.
    """

    def __init__(
        self,
        reward_funcs: Any | Sequence[Any],
        reward_weights: Sequence[float] | None = None,
        reward_processing_classes: Any | Sequence[Any] | None = None,
        *,
        all_none: str = "zero",
        **context: Any,
    ) -> None:
        specs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not specs:
            raise ValueError("at least one reward function is needed")
        procs = reward_processing_classes
        if not isinstance(procs, (list, tuple)):
            procs = [procs] * len(specs)
        if len(procs) != len(specs):
            raise ValueError(f"{len(procs)} reward_processing_classes for {len(specs)} reward functions")
        self.funcs = [resolve_reward_func(s, processing_class=p, **context) for s, p in zip(specs, procs)]
        self.names = self._unique_names([reward_func_name(f) for f in self.funcs])
        weights = [1.0] * len(self.funcs) if reward_weights is None else [float(w) for w in reward_weights]
        if len(weights) != len(self.funcs):
            raise ValueError(f"{len(weights)} reward_weights for {len(self.funcs)} reward functions")
        if all_none not in ("zero", "error"):
            raise ValueError(f"all_none must be 'zero' or 'error', got {all_none!r}")
        self.weights, self.all_none = weights, all_none
        self._warned_all_none = False

    @staticmethod
    def _unique_names(names: list[str]) -> list[str]:
        seen: dict[str, int] = {}
        out = []
        for n in names:
            seen[n] = seen.get(n, 0) + 1
            out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
        return out

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]],
                 **columns: Any) -> RewardBatch:
        n = len(completions)
        if len(prompts) != n or len(completion_ids) != n:
            raise ValueError(f"{len(prompts)} prompts, {n} completions, {len(completion_ids)} completion_ids")
        kwargs = dict(prompts=list(prompts), completions=list(completions),
                      completion_ids=[list(c) for c in completion_ids], **columns)
        results: dict[int, Any] = {}
        sync = [j for j, f in enumerate(self.funcs) if not _is_async(f)]
        pending = [j for j, f in enumerate(self.funcs) if _is_async(f)]
        for j in sync:
            try:
                results[j] = self.funcs[j](**_accepted_kwargs(self.funcs[j], kwargs))
            except Exception as err:  # noqa: BLE001 - re-raised with the sample named
                self._raise_located(j, kwargs, err)
        if pending:
            async def gather() -> list[Any]:
                calls = [self.funcs[j](**_accepted_kwargs(self.funcs[j], kwargs)) for j in pending]
                return await asyncio.gather(*calls, return_exceptions=True)

            for j, value in zip(pending, _run_coroutine(gather())):
                if isinstance(value, BaseException):
                    self._raise_located(j, kwargs, value)
                results[j] = value
        per_func = torch.stack([self._check(j, results[j], kwargs) for j in range(len(self.funcs))], dim=1)
        weights = torch.tensor(self.weights, dtype=torch.float32)
        applicable = ~torch.isnan(per_func)
        total = torch.where(applicable, per_func * weights, torch.zeros_like(per_func)).sum(dim=1)
        none_rows = (~applicable.any(dim=1)).nonzero().flatten().tolist()
        if none_rows:
            self._handle_all_none(none_rows, kwargs)
        return RewardBatch(self.names, per_func, total, all_none=len(none_rows), weights=list(self.weights))

    def _sample(self, i: int, kwargs: dict[str, Any]) -> str:
        return f"sample {i} (prompt={_short(kwargs['prompts'][i])}, completion={_short(kwargs['completions'][i])})"

    def _handle_all_none(self, rows: list[int], kwargs: dict[str, Any]) -> None:
        if self.all_none == "error":
            raise RewardFunctionError(
                f"every reward function returned None for {self._sample(rows[0], kwargs)} "
                f"({len(rows)} such samples in this batch)"
            )
        if not self._warned_all_none:
            logger.warning("every reward function returned None for %d sample(s), e.g. %s; they are left out of "
                           "the reward statistics and get advantage 0 (counted in rewards/all_none)", len(rows),
                           self._sample(rows[0], kwargs))
            self._warned_all_none = True

    def _check(self, j: int, values: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        name, n = self.names[j], len(kwargs["completions"])
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().flatten().tolist()
        try:
            values = list(values)
        except TypeError:
            raise RewardFunctionError(f"reward function {name!r} returned {type(values).__name__}, expected a list "
                                      f"of {n} floats or None") from None
        if len(values) != n:
            raise RewardFunctionError(f"reward function {name!r} returned {len(values)} values for {n} completions")
        out = []
        for i, v in enumerate(values):
            if v is None:
                out.append(math.nan)
                continue
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if not isinstance(v, numbers.Real):
                raise RewardFunctionError(f"reward function {name!r} returned {v!r} ({type(v).__name__}) for "
                                          f"{self._sample(i, kwargs)}; expected a float or None")
            if not math.isfinite(float(v)):
                raise RewardFunctionError(f"reward function {name!r} returned {float(v)} for {self._sample(i, kwargs)}; "
                                          "rewards must be finite (return None when a reward does not apply)")
            out.append(float(v))
        return torch.tensor(out, dtype=torch.float32)

    def _raise_located(self, j: int, kwargs: dict[str, Any], err: BaseException) -> None:
        """Re-run function ``j`` one sample at a time to name the sample that makes it raise."""
        func, name, n = self.funcs[j], self.names[j], len(kwargs["completions"])
        for i in range(n):
            single = {k: ([v[i]] if isinstance(v, list) and len(v) == n else v) for k, v in kwargs.items()}
            try:
                result = func(**_accepted_kwargs(func, single))
                if inspect.isawaitable(result):
                    _run_coroutine(result)
            except Exception as sample_err:  # noqa: BLE001
                raise RewardFunctionError(
                    f"reward function {name!r} raised {type(sample_err).__name__}: {sample_err} on {self._sample(i, kwargs)}"
                ) from sample_err
        raise RewardFunctionError(
            f"reward function {name!r} raised {type(err).__name__}: {err} on a batch of {n} samples "
            f"(no single sample reproduces it; first: {self._sample(0, kwargs)})"
        ) from err
