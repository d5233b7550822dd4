"""Direct Preference Optimization and its pairwise loss variants.

Every function here is pure: per-sequence log-probs in, ``(losses [B], metrics)`` out. The trainer sums
per-token log-probs over each completion (``chosen_logps = sum_t log pi(y_w,t | x, y_w,<t)``) and passes
the reference model's sums alongside; this module never sees logits or token ids.

Notation used in the docstrings, per pair ``i``:

- ``c = log pi(y_w|x) - log pi_ref(y_w|x)`` (chosen log-ratio), ``r = log pi(y_l|x) - log pi_ref(y_l|x)``
  (rejected log-ratio), ``h = c - r`` (the DPO logit), ``beta`` the KL strength, ``eps`` the label
  smoothing, ``sigma`` the logistic function.
- With ``reference_free=True`` the reference log-probs are taken as 0 (a uniform reference).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

DPO_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_pair", "apo_zero", "apo_down", "discopop", "sft",
)


F_DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
#: loss types whose logit is a difference of log-ratios, so an f-divergence can replace them (f-DPO)
F_DIVERGENCE_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


def f_divergence_scores(log_ratio: Tensor, kind: str = "reverse_kl", alpha: float = 0.5) -> Tensor:
    """f-DPO (Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
    Divergence Constraints", arXiv:2309.16240): the score ``f'(u)`` of a log-ratio ``t = log u = log pi/pi_ref``
    that replaces ``t`` in the DPO logit ``h = f'(u_w) - f'(u_l)``:

    - ``reverse_kl`` (DPO): ``t``
    - ``forward_kl``: ``f'(u) = 1 - 1/u = 1 - exp(-t)``
    - ``js_divergence``: ``f'(u) = log(2u / (1 + u)) = log 2 + log sigma(t)``
    - ``alpha_divergence``: ``f'(u) = (u^(a-1) - 1) / (a - 1) = (exp((a-1) t) - 1) / (a - 1)`` (``t`` at ``a = 1``;
      the exponent is clamped at 80 in float32, 11 in float16).
    """
    if kind == "reverse_kl":
        return log_ratio
    if kind == "forward_kl":
        return 1.0 - torch.exp(-log_ratio)
    if kind == "js_divergence":
        return math.log(2.0) + F.logsigmoid(log_ratio)
    if kind == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return log_ratio
        limit = 11.0 if log_ratio.dtype == torch.float16 else 80.0
        z = ((alpha - 1.0) * log_ratio).float().clamp(max=limit)
        return ((torch.exp(z) - 1.0) / (alpha - 1.0)).to(log_ratio.dtype)
    raise ValueError(f"f_divergence_type={kind!r}: expected one of {', '.join(F_DIVERGENCES)}")


def _sigmoid_smoothed(x: Tensor, eps: float) -> Tensor:
    """``-(1 - eps) log sigma(x) - eps log sigma(-x)``: the (conservative) logistic loss."""
    return -(1.0 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def dpo_single_loss(
    loss_type: str,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    bco_delta: float | Tensor = 0.0,
    discopop_tau: float = 0.05,
    chosen_lengths: Tensor | None = None,
) -> Tensor:
    """Per-pair loss ``[B]`` of one DPO variant; ``c``, ``r`` are the chosen/rejected log-ratios.

    Formulas (``h = c - r``):

    - ``sigmoid`` (DPO, Rafailov et al. 2023, arXiv:2305.18290; with ``eps > 0`` conservative DPO,
      Mitchell 2023): ``-(1-eps) log sigma(beta h) - eps log sigma(-beta h)``.
    - ``robust`` (rDPO, Chowdhury et al. 2024, arXiv:2403.00409):
      ``[-(1-eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps)``.
    - ``hinge`` (SLiC, Zhao et al. 2023, arXiv:2305.10425): ``max(0, 1 - beta h)``.
    - ``ipo`` (IPO, Azar et al. 2023, arXiv:2310.12036): ``(h - 1/(2 beta))^2``; the trainer passes
      length-averaged log-probs for this type (see :func:`dpo_loss`).
    - ``exo_pair`` (EXO, Ji et al. 2024, arXiv:2402.00856), with ``eps`` defaulting to 1e-3:
      ``sigma(beta h)(log sigma(beta h) - log(1-eps)) + sigma(-beta h)(log sigma(-beta h) - log eps)``.
    - ``nca_pair`` (NCA, Chen et al. 2024, arXiv:2402.05369):
      ``-log sigma(beta c) - 0.5 log sigma(-beta c) - 0.5 log sigma(-beta r)``.
    - ``bco_pair`` (BCO, Jung et al. 2024, arXiv:2404.04656) with reward shift ``delta``:
      ``-log sigma(beta c - delta) - log sigma(-(beta r - delta))``.
    - ``sppo_hard`` (SPPO, Wu et al. 2024, arXiv:2405.00675, hard-label form):
      ``(c - 1/(2 beta))^2 + (r + 1/(2 beta))^2``.
    - ``aot_pair`` (AOT, Melnyk et al. 2024, arXiv:2406.05882): sort ``c`` and ``r`` over the batch
      separately, ``d = sort(c) - sort(r)``, loss ``-(1-eps) log sigma(beta d) - eps log sigma(-beta d)``.
    - ``aot`` (AOT, same paper): ``d = sort(log pi(y_w) - log pi(y_l)) - sort(log ref(y_w) - log ref(y_l))``
      with the same logistic loss.
    - ``apo_zero`` (APO, D'Oosterlinck et al. 2024, arXiv:2408.06266): ``1 - sigma(beta c) + sigma(beta r)``.
    - ``apo_down`` (same paper): ``sigma(beta c) + 1 - sigma(beta (c - r))``.
    - ``discopop`` (DiscoPOP, Chris Lu et al. 2024, arXiv:2406.08414), ``x = beta h``,
      ``m = sigma(x / tau)``: ``(1 - m)(-log sigma(x)) + m exp(-x)``.
    - ``sft``: negative log-likelihood of the chosen response per token, ``-log pi(y_w|x) / |y_w|``
      (used as one term of MPO mixes, Wang et al. 2024, arXiv:2411.10442).
    """
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    eps = label_smoothing
    if loss_type == "sigmoid":
        return _sigmoid_smoothed(beta * h, eps)
    if loss_type == "robust":
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps}")
        return (-(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * eps)
    if loss_type == "hinge":
        return torch.relu(1.0 - beta * h)
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "exo_pair":
        e = eps if eps > 0 else 1e-3
        x = beta * h
        return torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-e)) + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(e))
    if loss_type == "nca_pair":
        cw, rw = beta * chosen_logratios, beta * rejected_logratios
        return -F.logsigmoid(cw) - 0.5 * F.logsigmoid(-cw) - 0.5 * F.logsigmoid(-rw)
    if loss_type == "bco_pair":
        cw, rw = beta * chosen_logratios, beta * rejected_logratios
        return -F.logsigmoid(cw - bco_delta) - F.logsigmoid(-(rw - bco_delta))
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "aot_pair":
        d = torch.sort(chosen_logratios).values - torch.sort(rejected_logratios).values
        return _sigmoid_smoothed(beta * d, eps)
    if loss_type == "aot":
        d = torch.sort(chosen_logps - rejected_logps).values - torch.sort(ref_chosen_logps - ref_rejected_logps).values
        return _sigmoid_smoothed(beta * d, eps)
    if loss_type == "apo_zero":
        return 1.0 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * chosen_logratios) + 1.0 - torch.sigmoid(beta * h)
    if loss_type == "discopop":
        x = beta * h
        m = torch.sigmoid(x / discopop_tau)
        return (1.0 - m) * -F.logsigmoid(x) + m * torch.exp(-x)
    if loss_type == "sft":
        nll = -chosen_logps
        return nll / chosen_lengths.clamp(min=1) if chosen_lengths is not None else nll
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    bco_delta: float | Tensor = 0.0,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO loss per pair, for one loss type or a weighted mix of several (MPO).

    ``f_divergence_type`` other than ``reverse_kl`` replaces each log-ratio by its f-divergence score
    (:func:`f_divergence_scores`, f-DPO) in the loss types of ``F_DIVERGENCE_LOSS_TYPES`` (``sft``, which has
    no log-ratio, is unchanged); the reported rewards stay ``beta *`` the log-ratios.

    ``loss = sum_k w_k * L_k(c, r)`` with ``L_k`` from :func:`dpo_single_loss`, ``w_k`` from ``loss_weights``
    (default 1 each). Arguments are per-sequence *summed* log-probs ``[B]``; for ``ipo`` (and ``sft``)
    the log-probs are divided by the completion lengths when they are given, as IPO is defined on
    average per-token log-likelihoods in practice. ``reference_free`` treats the reference log-probs as 0.

    The implicit rewards reported are ``beta * c`` and ``beta * r`` (Rafailov et al. 2023, Sec. 5).
    Returns ``(losses [B], metrics)`` with ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    ``rewards/accuracies`` (batch means, detached) and ``loss/<type>`` for each type in a mix.
    """
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = list(loss_weights) if loss_weights is not None else [1.0] * len(types)
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(types)} loss types {types}")
    zeros = torch.zeros_like(chosen_logps)
    if reference_free or ref_chosen_logps is None or ref_rejected_logps is None:
        if not reference_free:
            raise ValueError("reference log-probs are required unless reference_free=True")
        ref_chosen_logps, ref_rejected_logps = zeros, zeros

    if f_divergence_type != "reverse_kl" and not set(types) <= set(F_DIVERGENCE_LOSS_TYPES):
        raise ValueError(f"f_divergence_type={f_divergence_type!r} applies to the loss types "
                         f"{', '.join(F_DIVERGENCE_LOSS_TYPES)}; got {types}")
    losses = zeros
    metrics: dict[str, Tensor] = {}
    for name, w in zip(types, weights):
        pc, pr, rc, rr = chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
        if name == "ipo" and chosen_lengths is not None and rejected_lengths is not None:
            lc, lr = chosen_lengths.clamp(min=1), rejected_lengths.clamp(min=1)
            pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
        if f_divergence_type != "reverse_kl" and name != "sft":
            pc = f_divergence_scores(pc - rc, f_divergence_type, f_alpha_divergence_coef)
            pr = f_divergence_scores(pr - rr, f_divergence_type, f_alpha_divergence_coef)
            rc = rr = zeros
        single = dpo_single_loss(
            name, pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing, bco_delta=bco_delta,
            discopop_tau=discopop_tau, chosen_lengths=chosen_lengths,
        )
        losses = losses + w * single
        if len(types) > 1:
            metrics[f"loss/{name}"] = single.detach().mean()

    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()
    metrics.update(reward_metrics(chosen_rewards, rejected_rewards))
    return losses, metrics


def reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    """Batch means of the implicit rewards: chosen, rejected, margin, and the share of pairs ranked right."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
    }


def chosen_nll(chosen_logps: Tensor, chosen_lengths: Tensor, num_tokens: float | Tensor | None = None) -> Tensor:
    """Token-mean negative log-likelihood of the chosen responses: ``-sum_i log pi(y_w^i) / sum_i |y_w^i|``.

    The NLL term of RPO (``rpo_alpha``, Pang et al. 2024, arXiv:2404.19733), CPO (``cpo_alpha``) and ORPO.
    ``num_tokens`` replaces the denominator ``sum_i |y_w^i|``: the chosen-token count of the whole optimizer
    step under gradient accumulation, so that the mean is over the step's tokens, not each micro-batch's.
    """
    denom = chosen_lengths.sum() if num_tokens is None else torch.as_tensor(num_tokens, device=chosen_logps.device)
    return -chosen_logps.sum() / denom.clamp(min=1)


def length_desensitized_logps(
    token_logps: Tensor, mask: Tensor, public_lengths: Tensor, alpha: float
) -> Tensor:
    """Per-sequence LD-DPO log-probs from per-token log-probs ``[N, L]`` and a completion mask ``[N, L]``.

    LD-DPO (Liu et al. 2024, "Length Desensitization in Direct Preference Optimization",
    arXiv:2409.06411) splits each response at the public length ``l_p = min(|y_w|, |y_l|)`` of its pair
    and down-weights the excess: ``log p_hat(y|x) = sum_{t <= l_p} log p(y_t|.) + alpha * sum_{t > l_p} log p(y_t|.)``
    (``t`` counts completion tokens only, i.e. masked positions). ``alpha = 1`` is plain DPO.
    """
    m = mask.to(token_logps.dtype)
    position = mask.long().cumsum(-1)  # 1-based index among completion tokens
    weight = torch.where(position <= public_lengths.unsqueeze(-1), 1.0, alpha).to(token_logps.dtype)
    return (token_logps * m * weight).sum(-1)


def ld_pair_logps(
    chosen_token_logps: Tensor,
    chosen_mask: Tensor,
    rejected_token_logps: Tensor,
    rejected_mask: Tensor,
    alpha: float,
) -> tuple[Tensor, Tensor]:
    """LD-DPO log-probs ``(chosen [B], rejected [B])`` for paired rows; ``l_p`` is each pair's shorter length."""
    public = torch.minimum(chosen_mask.sum(-1), rejected_mask.sum(-1))
    return (
        length_desensitized_logps(chosen_token_logps, chosen_mask, public, alpha),
        length_desensitized_logps(rejected_token_logps, rejected_mask, public, alpha),
    )


def wpo_weights(token_logps: Tensor, token_log_sum_sq: Tensor, token_mask: Tensor) -> Tensor:
    """WPO's per-sequence weight (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization",
    Eq. 2, length-normalized): how likely the policy is to produce the response itself, relative to its own
    sampling::

        w(y | x) = exp( (1 / |y|) * sum_t [ log pi(y_t | x, y_<t) - log sum_v pi(v | x, y_<t)^2 ] )

    ``token_logps``, ``token_log_sum_sq``, ``token_mask``: ``[S, L]`` per completion token. Returns ``[S]``,
    detached (the weights scale each pair's loss; no gradient flows through them). A pair's loss is multiplied
    by ``w(chosen) * w(rejected)``.
    """
    mask = token_mask.to(token_logps.dtype)
    lengths = mask.sum(-1).clamp(min=1.0)
    aligned = ((token_logps.detach() - token_log_sum_sq.detach()) * mask).sum(-1) / lengths
    return torch.exp(aligned)
