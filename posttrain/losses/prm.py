"""Process reward model (PRM) loss and the aggregation of step scores into a trajectory score.

A PRM scores every intermediate step of a solution, not only the final answer (Lightman et al. 2023,
"Let's Verify Step by Step"; Uesato et al. 2022, "Solving math word problems with process- and
outcome-based feedback"). Steps are joined with a separator, and the model is a token classifier read
at the separator token that closes each step: label 1 if the step is correct, 0 if not, and -100
(ignored) at every other position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "AGGREGATIONS",
    "step_logits",
    "last_step_mask",
    "prm_loss",
    "step_metrics",
    "aggregate_step_scores",
]

IGNORE_INDEX = -100
AGGREGATIONS = ("min", "product", "last", "mean")


def step_logits(logits: torch.Tensor) -> torch.Tensor:
    """The log-odds ``z`` that a step is correct, one per position.

    A 2-label token classifier gives ``[..., 2]`` logits ``(l_0, l_1)``; its softmax probability of
    label 1 is ``sigmoid(l_1 - l_0)``, so ``z = l_1 - l_0``. A one-logit head (``[..., 1]``) or a bare
    ``[B, L]`` tensor is already ``z``.
    """
    if logits.dim() == 3 and logits.shape[-1] == 2:
        return logits[..., 1] - logits[..., 0]
    if logits.dim() == 3 and logits.shape[-1] == 1:
        return logits[..., 0]
    if logits.dim() == 2:
        return logits
    raise ValueError(f"expected logits of shape [B, L, 2], [B, L, 1] or [B, L], got {tuple(logits.shape)}")


def last_step_mask(labels: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, L]`` mask of the last labelled position (``labels != -100``) in each row."""
    valid = labels != IGNORE_INDEX
    positions = torch.arange(labels.shape[-1], device=labels.device).expand_as(labels)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).amax(dim=-1, keepdim=True)
    return valid & (positions == last)


def prm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    train_on_last_step_only: bool = False,
    num_steps: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-step binary cross-entropy of a process reward model.

    With ``z_s`` the log-odds at the separator position of step ``s`` (see :func:`step_logits`) and
    ``y_s`` in {0, 1} its label, over the set ``S`` of labelled positions (``labels != -100``):

        loss = (1 / |S|) * sum_{s in S} [ -y_s log sigmoid(z_s) - (1 - y_s) log(1 - sigmoid(z_s)) ]

    which for a 2-label head equals the token-classification cross-entropy at those positions
    (Lightman et al. 2023, "Let's Verify Step by Step"). With ``train_on_last_step_only`` only the
    last labelled position of each row counts (an outcome-style signal read through the same head).
    ``num_steps`` replaces ``|S|`` (the counted steps of the whole optimizer step under gradient accumulation).

    Returns ``(loss, metrics)`` with detached metrics over the counted positions: ``step_accuracy``
    (``sigmoid(z) > 0.5`` matches the label), ``positive_accuracy`` / ``negative_accuracy`` (the
    accuracy on steps labelled correct / incorrect; NaN when the batch has none of that class),
    ``positive_fraction`` (so the majority-class baseline is ``max(p, 1 - p)``) and ``num_steps``.
    A batch with no labelled position gives a zero loss that still carries gradient.
    """
    z = step_logits(logits)
    if z.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    mask = last_step_mask(labels) if train_on_last_step_only else labels != IGNORE_INDEX
    z_sel = z[mask].float()
    y_sel = labels[mask].float()
    if z_sel.numel() == 0:
        loss = z.sum() * 0.0
    else:
        denom = float(z_sel.numel()) if num_steps is None else torch.as_tensor(num_steps).to(z_sel)
        loss = F.binary_cross_entropy_with_logits(z_sel, y_sel, reduction="sum") / denom
    metrics = step_metrics(z_sel.detach(), y_sel)
    return loss, metrics


def step_metrics(z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Step-level metrics from flat log-odds ``z`` and 0/1 labels ``y`` (see :func:`prm_loss`)."""
    pred = (z > 0).float()
    correct = (pred == y).float()
    pos, neg = y == 1, y == 0
    nan = torch.tensor(float("nan"))
    return {
        "step_accuracy": correct.mean() if correct.numel() else nan,
        "positive_accuracy": correct[pos].mean() if pos.any() else nan,
        "negative_accuracy": correct[neg].mean() if neg.any() else nan,
        "positive_fraction": y.mean() if y.numel() else nan,
        "num_steps": torch.tensor(float(y.numel())),
    }


def aggregate_step_scores(scores: Sequence[float] | torch.Tensor, method: str = "min") -> float:
    """Reduce per-step correctness probabilities to one trajectory score.

    - ``"min"``: the weakest step bounds the solution (a chain is as good as its worst link).
    - ``"product"``: ``prod_s p_s``, the probability that every step is correct if step errors are
      independent (Lightman et al. 2023 rank solutions by this).
    - ``"last"``: the score after the final step, which has seen the whole solution.
    - ``"mean"``: the average step score.
    """
    values = [float(s) for s in (scores.tolist() if isinstance(scores, torch.Tensor) else scores)]
    if not values:
        raise ValueError("cannot aggregate an empty list of step scores")
    if method == "min":
        return min(values)
    if method in ("product", "prod"):
        return math.prod(values)
    if method == "last":
        return values[-1]
    if method == "mean":
        return sum(values) / len(values)
    raise ValueError(f"unknown aggregation {method!r}; expected one of {AGGREGATIONS}")
