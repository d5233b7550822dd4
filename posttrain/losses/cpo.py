"""Contrastive Preference Optimization (CPO) and SimPO: reference-free pairwise preference losses.

CPO (Xu et al. 2024, "Contrastive Preference Optimization", arXiv:2401.08417) drops DPO's reference
model: the logit is ``h = log pi(y_w|x) - log pi(y_l|x)`` and the total objective adds a behaviour-cloning
NLL on the chosen responses (``cpo_alpha``, added by the trainer with :func:`posttrain.losses.dpo.chosen_nll`).

SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
arXiv:2405.14734) uses the length-averaged log-likelihood as the implicit reward and a target margin
``gamma``: ``L = -log sigma(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dpo import reward_metrics

Tensor = torch.Tensor

CPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "hinge", "ipo", "simpo")


def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    alpha: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CPO / SimPO loss per pair from summed policy log-probs ``[B]`` (no reference model).

    For ``simpo`` and ``ipo`` the log-probs are first divided by the completion lengths (which are then
    required): ``s_w = log pi(y_w|x) / |y_w|``; other types use the sums. With ``h = s_w - s_l``:

    - ``sigmoid`` (CPO): ``-(1-eps) log sigma(beta h) - eps log sigma(-beta h)``
    - ``hinge``: ``max(0, 1 - beta h)``
    - ``ipo``: ``(h - 1/(2 beta))^2``
    - ``simpo``: ``-(1-eps) log sigma(beta h - gamma) - eps log sigma(-(beta h - gamma))``

    ``alpha != 0`` first reshapes each score with AlphaPO's reward (Gupta et al. 2025, "AlphaPO: Reward Shape
    Matters for LLM Alignment", arXiv:2501.03884): ``s <- (1 - exp(-alpha s)) / alpha`` (that is
    ``(1 - p^-alpha) / alpha`` for ``s = log p``; ``alpha -> 0`` recovers ``s``).

    Rewards reported are ``beta * s_w`` and ``beta * s_l``. Returns ``(losses [B], metrics)``.
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"unknown CPO loss_type {loss_type!r}; expected one of {', '.join(CPO_LOSS_TYPES)}")
    if loss_type in ("simpo", "ipo"):
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"CPO loss_type {loss_type!r} averages log-probs per token: pass the lengths")
        chosen_logps = chosen_logps / chosen_lengths.clamp(min=1)
        rejected_logps = rejected_logps / rejected_lengths.clamp(min=1)
    if alpha != 0.0:
        chosen_logps = (1 - torch.exp(-alpha * chosen_logps)) / alpha
        rejected_logps = (1 - torch.exp(-alpha * rejected_logps)) / alpha
    h = chosen_logps - rejected_logps
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "simpo":
        x = beta * h - simpo_gamma
        losses = -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo
        losses = (h - 1 / (2 * beta)) ** 2
    metrics = reward_metrics(beta * chosen_logps, beta * rejected_logps)
    return losses, metrics
