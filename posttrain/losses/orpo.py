"""Odds Ratio Preference Optimization (ORPO): SFT plus an odds-ratio penalty, no reference model.

Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", arXiv:2403.07691.
With ``P(y|x) = exp(log pi(y|x) / |y|)`` (the per-token geometric mean likelihood) and
``odds(y|x) = P / (1 - P)``:

    L_OR = -log sigma( log odds(y_w|x) - log odds(y_l|x) )
    L_ORPO = L_SFT(y_w) + beta * L_OR            (beta is the paper's lambda)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dpo import reward_metrics

Tensor = torch.Tensor


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends (Maechler 2012): ``log(-expm1(x))`` near 0,
    ``log1p(-exp(x))`` far from it. ``x`` is clamped just below 0 so ``P = 1`` gives a finite value."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """ORPO's odds-ratio term per pair, ``beta * L_OR`` (``[B]``), from summed policy log-probs.

    ``s = log pi(y|x) / |y|``; ``log odds = s - log(1 - exp(s))``; loss ``-beta log sigma(lo_w - lo_l)``.
    The chosen NLL (``L_SFT``) is added by the trainer. Rewards reported are ``beta * s``; metrics also hold
    ``log_odds_ratio`` (mean of ``log sigma(lo_w - lo_l)``) and ``log_odds_chosen`` (mean ``lo_w - lo_l``).
    """
    s_w = chosen_logps / chosen_lengths.clamp(min=1)
    s_l = rejected_logps / rejected_lengths.clamp(min=1)
    log_odds = (s_w - s_l) - (log1mexp(s_w) - log1mexp(s_l))
    ratio = F.logsigmoid(log_odds)
    losses = -beta * ratio
    metrics = reward_metrics(beta * s_w, beta * s_l)
    metrics["log_odds_ratio"] = ratio.detach().mean()
    metrics["log_odds_chosen"] = log_odds.detach().mean()
    return losses, metrics
