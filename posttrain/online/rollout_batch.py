"""`RolloutBatch`: what the loss of an online method needs, per completion, and its split into micro-batches.

A batch holds ``N`` completions with their prompts as token-id lists and any number of *named tensors*,
each of shape ``[N]`` (per sequence: rewards, advantages of GRPO/RLOO) or ``[N, Lc]`` (per token,
completion-aligned and left-aligned: the loss mask, old/reference/sampler log-probs, PPO's values and
per-token advantages). Every tensor is sliced the same generic way, so a method adds the tensors it
needs (``batch.values = ...``) without touching this module.

``group_ids [N]`` say which completions belong together (the ``num_generations`` samples of one prompt,
or the two sides of a preference pair). `RolloutBatch.split` shuffles *whole groups* and cuts at group
boundaries, so a group is never spread over micro-batches while there are at least as many groups as
micro-batches (a group larger than a micro-batch fills consecutive micro-batches of one optimizer step).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

__all__ = ["RolloutBatch"]

_FIELDS = ("prompt_ids", "completion_ids", "tensors", "group_ids", "extra", "num_items_in_batch")


class RolloutBatch:
    """Per-completion training inputs of an online method.

    ``RolloutBatch(prompt_ids, completion_ids, completion_mask, advantages=None, *, group_ids=None,
    extra=None, num_items_in_batch=None, **tensors)``; every keyword tensor becomes a named tensor,
    read and written as an attribute (``batch.old_logps``) or with `get` (``None`` when absent).

    ``completion_mask [N, Lc]`` (float) marks the tokens that count in the loss. ``extra`` holds
    per-completion Python values (lists of length ``N``). ``num_items_in_batch`` is set by the training
    loop: the loss-token count a token-normalized loss divides by (see
    `posttrain.trainers._online.OnlineTrainer.get_batch_samples`).
    """

    def __init__(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], completion_mask: torch.Tensor,
                 advantages: torch.Tensor | None = None, *, group_ids: torch.Tensor | None = None,
                 extra: dict[str, list] | None = None, num_items_in_batch: float | None = None,
                 **tensors: torch.Tensor | None) -> None:
        n = len(completion_ids)
        if len(prompt_ids) != n:
            raise ValueError(f"{len(prompt_ids)} prompts for {n} completions")
        object.__setattr__(self, "prompt_ids", prompt_ids)
        object.__setattr__(self, "completion_ids", completion_ids)
        object.__setattr__(self, "tensors", {})
        object.__setattr__(self, "group_ids", torch.arange(n) if group_ids is None else group_ids.long())
        object.__setattr__(self, "extra", dict(extra or {}))
        object.__setattr__(self, "num_items_in_batch", num_items_in_batch)
        self.completion_mask = completion_mask
        self.advantages = advantages
        for name, value in tensors.items():
            setattr(self, name, value)

    # ------------------------------------------------------------------------------ named tensors
    def __getattr__(self, name: str) -> torch.Tensor:
        tensors = self.__dict__.get("tensors", {})
        if name in tensors:
            return tensors[name]
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"RolloutBatch has no tensor {name!r} (it has {sorted(tensors)}); use batch.get({name!r}) "
                             "for an optional one")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FIELDS:
            object.__setattr__(self, name, value)
            return
        if value is None:
            self.tensors.pop(name, None)
            return
        if not isinstance(value, torch.Tensor) or value.dim() not in (1, 2) or value.shape[0] != len(self):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"RolloutBatch.{name}: expected a tensor [N] or [N, Lc] with N={len(self)}, got {shape}")
        self.tensors[name] = value

    def get(self, name: str, default: Any = None) -> Any:
        """The named tensor, or ``default`` when the batch has none of that name."""
        return self.tensors.get(name, default)

    def __len__(self) -> int:
        return len(self.completion_ids)

    def __contains__(self, name: str) -> bool:
        """Whether the batch has a tensor ``name`` (the Trainer probes inputs this way, e.g. for ``labels``)."""
        return name in self.tensors

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self.tensors.items()}
        return f"RolloutBatch(N={len(self)}, groups={self.num_groups}, tensors={shapes}, extra={sorted(self.extra)})"

    @property
    def num_loss_tokens(self) -> float:
        return float(self.completion_mask.sum())

    @property
    def num_groups(self) -> int:
        return int(self.group_ids.unique().numel()) if len(self) else 0

    def groups(self) -> list[list[int]]:
        """Completion indices of each group, groups in order of first appearance."""
        order: dict[int, list[int]] = {}
        for i, g in enumerate(self.group_ids.tolist()):
            order.setdefault(g, []).append(i)
        return list(order.values())

    # --------------------------------------------------------------------------------- slicing
    def select(self, index: list[int]) -> "RolloutBatch":
        """The completions at ``index`` (in that order); ``[N, Lc]`` tensors trimmed to their longest completion."""
        width = max([len(self.completion_ids[i]) for i in index] + [1])
        idx = torch.tensor(index, dtype=torch.long)
        tensors = {}
        for name, value in self.tensors.items():
            picked = value[idx.to(value.device)]
            tensors[name] = picked[:, :width] if picked.dim() == 2 else picked
        return RolloutBatch(
            [self.prompt_ids[i] for i in index], [self.completion_ids[i] for i in index],
            group_ids=self.group_ids[idx], extra={k: [v[i] for i in index] for k, v in self.extra.items()},
            num_items_in_batch=self.num_items_in_batch, **tensors,
        )

    def split(self, num_chunks: int, generator: torch.Generator | None = None, shuffle: bool = True) -> list["RolloutBatch"]:
        """``num_chunks`` micro-batches of whole groups, after a seeded shuffle of the groups.

        With at least ``num_chunks`` groups every cut falls on a group boundary (sizes differ by at most
        one group); with fewer, the shuffled completions are cut evenly and a group fills consecutive
        micro-batches.
        """
        if num_chunks < 1:
            raise ValueError(f"num_chunks={num_chunks}: expected >= 1")
        groups = self.groups()
        if shuffle and len(groups) > 1:
            perm = torch.randperm(len(groups), generator=generator).tolist()
            groups = [groups[p] for p in perm]
        if len(groups) >= num_chunks:
            bounds = [round(k * len(groups) / num_chunks) for k in range(num_chunks + 1)]
            return [self.select([i for g in groups[bounds[k]:bounds[k + 1]] for i in g]) for k in range(num_chunks)]
        order = [i for g in groups for i in g]
        bounds = [round(k * len(order) / num_chunks) for k in range(num_chunks + 1)]
        return [self.select(order[bounds[k]:bounds[k + 1]]) for k in range(num_chunks)]

    @classmethod
    def concat(cls, batches: Iterable["RolloutBatch"]) -> "RolloutBatch":
        """One batch from several (group ids renumbered so groups stay distinct); ``[N, Lc]`` tensors are
        right-padded with zeros to the widest."""
        batches = [b for b in batches if len(b)]
        if not batches:
            raise ValueError("RolloutBatch.concat needs at least one non-empty batch")
        names = set(batches[0].tensors)
        if any(set(b.tensors) != names for b in batches):
            raise ValueError(f"cannot concatenate batches with different tensors: {[sorted(b.tensors) for b in batches]}")
        tensors = {}
        for name in names:
            parts = [b.tensors[name] for b in batches]
            if parts[0].dim() == 2:
                width = max(p.shape[1] for p in parts)
                parts = [torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts]
            tensors[name] = torch.cat(parts)
        group_ids, offset = [], 0
        for b in batches:
            group_ids.append(b.group_ids - b.group_ids.min() + offset)
            offset = int(group_ids[-1].max()) + 1
        extra = {k: [v for b in batches for v in b.extra[k]] for k in batches[0].extra}
        return cls([p for b in batches for p in b.prompt_ids], [c for b in batches for c in b.completion_ids],
                   group_ids=torch.cat(group_ids), extra=extra, **tensors)
