"""The reference policy of the preference and online trainers, with as few model copies as possible.

Where reference log-probs come from, in order of preference:

1. precomputed columns (``precompute_ref_log_probs``): one reference forward per example before training,
   with a progress bar, cached on disk under a key made of the tokenized data and the reference weights, so
   re-runs and later epochs reuse it; the reference model (if any) is then dropped;
2. a ``ref_model`` the caller gave (a model, or a name or path to load), frozen, whether or not the policy
   has PEFT adapters: it may be another checkpoint than the adapters' base (as in TRL);
3. without one, the policy itself with its PEFT adapters disabled (no second model);
4. without one or adapters, a frozen copy of the initial policy.

The reference must not be the policy's own weights: `resolve_reference` refuses a ``ref_model`` that is, or
shares parameters with, ``model`` (freezing it would freeze the policy) and names the fix.

TR-DPO (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment", arXiv:2404.09656)
moves the reference toward the policy every ``ref_model_sync_steps``: ``ref <- alpha * policy + (1 - alpha) * ref``
(:class:`SyncRefModelCallback`).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from typing import Any, Callable, Iterator, Sequence

import datasets
import torch
from transformers import TrainerCallback

from ..models import adapters_disabled, is_peft_model, unwrap_model

logger = logging.getLogger(__name__)

__all__ = ["check_distinct_reference", "frozen_copy", "reference_context", "resolve_reference", "shares_weights",
           "precompute_columns", "dataset_content_hash", "model_fingerprint", "SyncRefModelCallback",
           "default_cache_dir"]


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` in eval mode with gradients off (the default reference policy)."""
    ref = copy.deepcopy(unwrap_model(model))
    ref.eval()
    ref.requires_grad_(False)
    return ref


def shares_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two modules are the same object or hold a parameter tensor in common (also through PEFT or
    DDP wrappers, which keep the wrapped model's parameters)."""
    if a is b or unwrap_model(a) is unwrap_model(b):
        return True
    storage = {p.data_ptr() for p in a.parameters() if p.data_ptr() != 0}
    return any(p.data_ptr() in storage for p in b.parameters())


def check_distinct_reference(model: Any, ref_model: Any) -> None:
    """Raise when ``ref_model`` is ``model`` itself (or shares its weights): the trainer freezes the reference,
    which would freeze the policy and fail at the first backward with "does not require grad"."""
    modules = isinstance(model, torch.nn.Module) and isinstance(ref_model, torch.nn.Module)
    if modules and shares_weights(model, ref_model):
        raise ValueError(
            "ref_model is the same model as model (or shares its weights), so freezing the reference would "
            "freeze the policy. Pass ref_model=None (the reference is then a frozen copy of the initial model, "
            "or under PEFT the base with adapters disabled), or a separate copy: ref_model=copy.deepcopy(model)."
        )


def resolve_reference(
    policy: torch.nn.Module,
    ref_model: Any,
    *,
    load: Callable[[str], torch.nn.Module] | None = None,
    copy_policy: bool = True,
) -> torch.nn.Module | None:
    """The reference module a trainer keeps (frozen, eval mode), or None when the policy's PEFT base serves.

    A given ``ref_model`` is used whatever the policy is (a name or path is loaded with ``load``); without one,
    a PEFT policy needs none (its adapters are disabled for the reference forward) and any other policy gets
    a frozen copy of itself when ``copy_policy`` (else None: the caller precomputes from the policy before
    it trains). A ``ref_model`` sharing the policy's weights is refused (`check_distinct_reference`).
    """
    if isinstance(ref_model, (str, os.PathLike)):
        if load is None:
            raise ValueError(f"ref_model={ref_model!r} is a name or path, but nothing here can load it")
        ref_model = load(os.fspath(ref_model))
    if ref_model is None:
        if is_peft_model(policy) or not copy_policy:
            return None
        return frozen_copy(policy)
    if not isinstance(ref_model, torch.nn.Module):
        raise TypeError(f"ref_model must be a model, a name or a path, got {type(ref_model).__name__}")
    check_distinct_reference(policy, ref_model)
    ref_model.eval()
    ref_model.requires_grad_(False)
    return ref_model


@contextlib.contextmanager
def reference_context(policy: torch.nn.Module, ref_model: torch.nn.Module | None) -> Iterator[torch.nn.Module]:
    """Yields the module whose forward is the reference policy, under ``torch.no_grad``.

    ``ref_model`` when there is one; else the policy with PEFT adapters disabled; else the policy itself
    (only valid before any update, i.e. while precomputing reference log-probs).
    """
    with torch.no_grad():
        if ref_model is not None:
            yield ref_model
        elif is_peft_model(policy):
            with adapters_disabled(policy):
                yield policy
        else:
            yield policy


def default_cache_dir() -> str:
    """``$HF_DATASETS_CACHE/posttrain_ref_logps``: next to the datasets cache that holds the data itself."""
    return os.path.join(str(datasets.config.HF_DATASETS_CACHE), "posttrain_ref_logps")


def dataset_content_hash(dataset: datasets.Dataset, columns: Sequence[str]) -> str:
    """A hash of the listed columns' values (row order included), independent of how the dataset was made."""
    h = hashlib.sha256()
    table = dataset.with_format("arrow")
    for name in columns:
        if name in dataset.column_names:
            h.update(name.encode())
            col = table[name]
            for chunk in col.chunks if hasattr(col, "chunks") else [col]:
                for buf in chunk.flatten().buffers() if hasattr(chunk, "flatten") and chunk.type.num_fields else chunk.buffers():
                    if buf is not None:
                        h.update(memoryview(buf))
    h.update(str(len(dataset)).encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module, *, exclude_adapters: bool = False) -> str:
    """A cheap fingerprint of a model's weights: config, parameter names and shapes, and exact sums of a
    strided sample of each tensor (a trained and an untrained copy differ; hashing every byte of a large
    model would take seconds). ``exclude_adapters`` skips PEFT adapter weights (the reference of a PEFT
    model is its base, whatever the adapters' random initialization)."""
    h = hashlib.sha256()
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    for name, p in base.state_dict().items():
        if exclude_adapters and any(k in name for k in _ADAPTER_KEYS):
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step].double()
        h.update(f"{name}{tuple(p.shape)}{sample.sum().item():.17g}{sample.abs().sum().item():.17g}".encode())
    return h.hexdigest()[:24]


_ADAPTER_KEYS = ("lora_", "modules_to_save", "prompt_encoder", "ia3_", "vera_", "boft_", "oft_")


def precompute_columns(
    dataset: datasets.Dataset,
    *,
    columns: Sequence[str],
    collate: Callable[[list[dict]], dict],
    compute: Callable[[dict], torch.Tensor],
    batch_size: int,
    cache_key: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    description: str = "reference log-probs",
    show_progress: bool = True,
) -> datasets.Dataset:
    """Add float columns computed by ``compute`` on collated batches, once per example.

    ``compute(batch)`` returns ``[len(columns) * B]`` values in the collator's sequence order (column-major:
    all of column 0 first). With a ``cache_key`` the values are saved under ``cache_dir`` and reused when the
    same key (data content, reference weights, settings) comes back.
    """
    path = None
    if cache_key is not None:
        digest = hashlib.sha256(json.dumps(cache_key, sort_keys=True, default=str).encode()).hexdigest()[:32]
        path = os.path.join(cache_dir or default_cache_dir(), f"{digest}.pt")
        if os.path.exists(path):
            values = torch.load(path)
            if values.shape == (len(columns), len(dataset)):
                logger.info("reusing cached %s from %s", description, path)
                return _with_columns(dataset, columns, values)
    values = torch.empty(len(columns), len(dataset), dtype=torch.float32)
    with _progress(description, len(dataset), show_progress) as advance:
        for start in range(0, len(dataset), batch_size):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            features = [dict(zip(rows.column_names, vals)) for vals in zip(*(rows[c] for c in rows.column_names))]
            out = compute(collate(features)).detach().float().cpu()
            values[:, start:start + len(features)] = out.view(len(columns), len(features))
            advance(len(features))
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save(values, tmp)
        os.replace(tmp, path)
    return _with_columns(dataset, columns, values)


def _with_columns(dataset: datasets.Dataset, columns: Sequence[str], values: torch.Tensor) -> datasets.Dataset:
    for name, col in zip(columns, values.tolist()):
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
        dataset = dataset.add_column(name, col)
    return dataset


@contextlib.contextmanager
def _progress(description: str, total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("<"), TimeRemainingColumn(), transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


class SyncRefModelCallback(TrainerCallback):
    """TR-DPO soft update of the reference model every ``sync_steps`` optimizer steps:
    ``theta_ref <- alpha * theta + (1 - alpha) * theta_ref`` (parameters matched by name)."""

    def __init__(self, ref_model: torch.nn.Module, alpha: float, sync_steps: int) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"ref_model_mixup_alpha must be in [0, 1], got {alpha}")
        if sync_steps < 1:
            raise ValueError(f"ref_model_sync_steps must be >= 1, got {sync_steps}")
        self.ref_model, self.alpha, self.sync_steps = ref_model, alpha, sync_steps
        self.num_syncs = 0

    @torch.no_grad()
    def sync(self, model: torch.nn.Module) -> None:
        policy = dict(unwrap_model(model).named_parameters())
        for name, ref_p in unwrap_model(self.ref_model).named_parameters():
            p = policy.get(name)
            if p is not None and p.shape == ref_p.shape:
                ref_p.mul_(1 - self.alpha).add_(p.detach().to(ref_p.dtype), alpha=self.alpha)
        self.num_syncs += 1

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and state.global_step % self.sync_steps == 0:
            self.sync(model)
