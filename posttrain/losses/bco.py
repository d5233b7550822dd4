"""Binary Classifier Optimization (BCO): alignment from thumbs-up / thumbs-down signals.

Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment", arXiv:2404.04656.
The implicit reward ``r(x, y) = beta (log pi(y|x) - log pi_ref(y|x))`` is the logit of a binary classifier
that separates desirable from undesirable completions, shifted by ``delta``, a running mean of the rewards
(the "reward shift" that ties the BCE loss to DPO):

    desirable y:    L = -lambda_D log sigma(r(x, y) - delta)
    undesirable y:  L = -lambda_U w(x) log sigma(-(r(x, y) - delta))

``lambda_D`` / ``lambda_U`` are class weights of the binary cross-entropy (1 by default; as KTO's
``desirable_weight`` / ``undesirable_weight``, they balance unequal class counts or favour raising the
desirable completions' likelihood over pushing the undesirable ones down). ``w(x)`` is 1 unless
Underlying Distribution Matching (UDM) is on: then undesirable examples are re-weighted by the density
ratio ``p_D(x) / p_U(x)`` of their prompt under the desirable and undesirable prompt distributions,
estimated with a probabilistic classifier on prompt embeddings,
``w = clamp(P(D|x) / (1 - P(D|x)), min_ratio, max_ratio)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kto import unpaired_reward_metrics

Tensor = torch.Tensor


class RunningMean:
    """Count-weighted running mean of every value passed to :meth:`update`; BCO's reward shift ``delta``.

    The trainer updates it with the batch's mean reward (detached) before computing the loss, so ``delta``
    is the average of per-batch mean rewards seen so far, the current batch included.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0

    def update(self, values: Tensor) -> float:
        """Fold ``values`` (any shape) into the mean; returns the new mean."""
        values = values.detach().float().flatten()
        n = values.numel()
        if n:
            total = self.count + n
            self.mean += (values.sum().item() - n * self.mean) / total
            self.count = total
        return self.mean

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])


def bco_loss(
    logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    *,
    beta: float = 0.1,
    delta: float | Tensor = 0.0,
    udm_weights: Tensor | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example BCO loss ``[B]`` from summed log-probs ``[B]`` and boolean ``labels`` (True = desirable).

    ``udm_weights`` (``[B]``, optional) multiplies the undesirable examples' losses only (desirable
    examples keep weight 1); ``desirable_weight`` / ``undesirable_weight`` scale each class. Metrics as
    :func:`posttrain.losses.kto.unpaired_reward_metrics` plus ``delta``.
    """
    labels = labels.bool()
    rewards = beta * (logps - ref_logps)
    shifted = rewards - delta
    desirable = -desirable_weight * F.logsigmoid(shifted)
    undesirable = -undesirable_weight * F.logsigmoid(-shifted)
    if udm_weights is not None:
        undesirable = undesirable * udm_weights
    losses = torch.where(labels, desirable, undesirable)
    metrics = unpaired_reward_metrics(rewards.detach(), logps.detach(), labels)
    metrics["delta"] = torch.as_tensor(delta, dtype=logps.dtype).detach().reshape(())
    return losses, metrics


def udm_density_ratio(
    prob_desirable: Tensor, *, min_ratio: float = 0.5, max_ratio: float = 10.0, eps: float = 1e-8
) -> Tensor:
    """UDM importance weight ``clamp(p / (1 - p), min_ratio, max_ratio)`` from a classifier's ``P(D|x)``."""
    return (prob_desirable / (1 - prob_desirable + eps)).clamp(min=min_ratio, max=max_ratio)
