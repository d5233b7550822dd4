"""GRPO's newer objectives and controls, each a pure tensor function (TRL 1.16's GRPOConfig names them).

Per-token tensors are ``[B, L]`` aligned with the completion tokens, ``mask`` marks the ones in the loss,
``advantages`` is ``[B]`` (one per completion); nothing here shifts or sees logits.
"""

from __future__ import annotations

import torch

__all__ = ["sequence_log_ratio", "sapo_objective", "vespo_weights", "off_policy_sequence_mask", "high_entropy_mask",
           "adaptive_entropy_coef", "normalize_then_sum_advantages", "sequence_importance_weights"]


def sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, 1]`` mean over each sequence's tokens of ``log_ratio``: the log of the sequence-level
    (geometric-mean) importance ratio of GSPO (Zheng et al. 2025, arXiv:2507.18071), used by
    ``importance_sampling_level="sequence"``."""
    m = mask.to(log_ratio.dtype)
    return ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def sapo_objective(ratio: torch.Tensor, advantages: torch.Tensor, temperature_pos: float,
                   temperature_neg: float) -> torch.Tensor:
    """SAPO's soft-gated surrogate (to maximise), elementwise (Gao et al. 2025, "Soft Adaptive Policy
    Optimization", arXiv:2511.20347)::

        J = (4 / tau) * sigmoid(tau * (r - 1)) * A,   tau = tau_pos if A > 0 else tau_neg

    A smooth gate instead of PPO's hard clip: at ``r = 1`` its gradient equals the plain policy gradient
    (``d/dr = sigmoid'(0) * 4 = 1``) and it decays smoothly as ``r`` leaves 1, faster for negative advantages
    when ``tau_neg > tau_pos``. ``advantages`` broadcasts against ``ratio`` (``[B, 1]`` against ``[B, L]``)."""
    tau = torch.where(advantages > 0, torch.as_tensor(temperature_pos, dtype=ratio.dtype, device=ratio.device),
                      torch.as_tensor(temperature_neg, dtype=ratio.dtype, device=ratio.device))
    return torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * advantages


@torch.no_grad()
def vespo_weights(log_ratio: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, *, k_pos: float = 2.0,
                  lambda_pos: float = 3.0, k_neg: float = 3.0, lambda_neg: float = 2.0,
                  sampler_log_ratio: torch.Tensor | None = None) -> torch.Tensor:
    """VESPO's Gamma weight per sequence ``[B, 1]``, detached (VESPO, "Variational Sequence-Level Soft Policy
    Optimization", arXiv:2602.10693)::

        w   = exp(sum_t log(pi / pi_old))        (times the sampler correction exp(sum_t log(pi_old / mu)))
        phi = exp(lambda) * w^k * exp(-lambda * w)      (so phi(1) = 1; peak at w = k / lambda)

    with ``(k, lambda) = (k_pos, lambda_pos)`` for ``A >= 0`` else ``(k_neg, lambda_neg)``. The loss is then
    ``-phi * A * log pi`` per token, so ``phi`` scales the policy gradient of the whole sequence: it vanishes for
    sequences far off-policy in either direction instead of being clipped. Log-ratios are clamped to
    [-20, 20] per token and ``log w`` to [log 1e-8, 20] for stability."""
    m = mask.to(log_ratio.dtype)
    seq = (log_ratio.clamp(-20.0, 20.0) * m).sum(-1, keepdim=True)
    if sampler_log_ratio is not None:
        seq = seq + (sampler_log_ratio.clamp(-20.0, 20.0) * m).sum(-1, keepdim=True)
    log_w = seq.clamp(min=torch.log(torch.tensor(1e-8)).item(), max=20.0)
    adv = advantages.reshape(-1, 1).to(log_ratio.dtype)
    k = torch.where(adv >= 0, torch.full_like(adv, k_pos), torch.full_like(adv, k_neg))
    lam = torch.where(adv >= 0, torch.full_like(adv, lambda_pos), torch.full_like(adv, lambda_neg)).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@torch.no_grad()
def off_policy_sequence_mask(advantages: torch.Tensor, logps: torch.Tensor, sampler_logps: torch.Tensor,
                             mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """Off-policy sequence masking (DeepSeek-AI 2025, DeepSeek-V3.2, arXiv:2512.02556, Eq. 9): ``[B, 1]``, 0 for a
    sequence with a negative advantage whose mean per-token KL from the sampling policy,
    ``mean_t(log mu - log pi)``, exceeds ``threshold`` (too far off-policy to learn from its mistakes), else 1.
    Tokens without a sampler log-prob (NaN) count as 0."""
    m = mask.to(logps.dtype)
    gap = torch.nan_to_num(sampler_logps - logps.detach(), nan=0.0)
    mean_kl = (gap * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    keep = (advantages.reshape(-1, 1) >= 0) | (mean_kl <= threshold)
    return keep.to(logps.dtype)


@torch.no_grad()
def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """``[B, L]`` bool: the loss tokens whose entropy is in the top ``quantile`` share of this batch's loss tokens
    (entropy >= the ``1 - quantile`` quantile), the "forking tokens" of Wang et al. 2025 ("Beyond the 80/20 Rule:
    High-Entropy Minority Tokens Drive Effective RL for LLM Reasoning", arXiv:2506.01939). ``quantile=1`` keeps
    every loss token."""
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile={quantile}: expected a value in (0, 1]")
    on = mask.bool()
    values = entropy.detach().float()[on]
    if quantile >= 1.0 or values.numel() == 0:
        return on
    threshold = torch.quantile(values, 1.0 - quantile)
    return on & (entropy.detach().float() >= threshold)


def adaptive_entropy_coef(coef: float, entropy: float, target: float, delta: float, low: float,
                          high: float) -> float:
    """Adaptive entropy control (He et al. 2025, Skywork-OR1, arXiv:2505.22312): after each optimizer step the
    entropy-bonus coefficient grows by ``delta`` when the measured entropy is at or below ``target`` and shrinks
    by ``delta`` otherwise, kept in ``[low, high]``. (The bonus itself is applied only while entropy <= target.)"""
    coef = coef + delta if entropy <= target else coef - delta
    return float(min(max(coef, low), high))


def normalize_then_sum_advantages(per_func: torch.Tensor, weights: torch.Tensor, num_generations: int,
                                  valid: torch.Tensor | None = None, eps: float = 1e-4) -> torch.Tensor:
    """GDPO's decoupled normalization for several rewards (Liu et al. 2026, "GDPO: Group reward-Decoupled
    Normalization Policy Optimization", arXiv:2601.05242)::

        a_{i,k} = (r_{i,k} - mean_group(r_k)) / (std_group(r_k) + eps)     for each reward function k
        s_i     = sum_k w_k a_{i,k}
        A_i     = (s_i - mean_batch(s)) / (std_batch(s) + eps)

    so a reward with a large scale cannot drown the others (``sum_then_normalize``, the default, sums first).
    ``per_func`` is ``[N, K]`` (NaN where a function gave no reward, ignored), ``N`` a multiple of
    ``num_generations``; completions with ``valid=False`` get advantage 0. Standard deviations are unbiased."""
    n, k = per_func.shape
    grouped = per_func.float().view(-1, num_generations, k)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    centred = grouped - mean
    count = (~torch.isnan(grouped)).sum(1, keepdim=True)
    var = torch.nansum(centred ** 2, dim=1, keepdim=True) / (count - 1).clamp(min=1)
    normalized = (centred / (var.sqrt() + eps)).view(n, k)
    summed = torch.nansum(normalized * weights.float().view(1, k), dim=1)
    keep = torch.ones(n, dtype=torch.bool) if valid is None else valid.bool().cpu()
    kept = summed[keep]
    std = kept.std() if kept.numel() > 1 else torch.zeros(())
    adv = (summed - kept.mean()) / (std + eps) if kept.numel() else torch.zeros_like(summed)
    return torch.where(keep, adv, torch.zeros_like(adv))


def sequence_importance_weights(old_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor,
                                mode: str, *, low: float = 0.0, high: float = 3.0) -> torch.Tensor:
    """Sequence-level sampler correction ``[B, 1]`` (TRL's ``vllm_importance_sampling_mode`` 'sequence_*'; Yao et
    al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"): the ratio of the whole
    completion, ``rho = exp(sum_t (old_logp - sampler_logp))``, truncated at ``high`` ('truncate') or set to 0
    outside ``[low, high]`` ('mask'). Detached."""
    m = mask.to(old_logps.dtype)
    gap = torch.nan_to_num(old_logps.detach() - sampler_logps, nan=0.0)
    rho = torch.exp(((gap * m).sum(-1, keepdim=True)).clamp(max=20.0))
    if mode == "truncate":
        return rho.clamp(max=high)
    if mode == "mask":
        return torch.where((rho >= low) & (rho <= high), rho, torch.zeros_like(rho))
    raise ValueError(f"sequence importance-sampling mode {mode!r}: expected 'truncate' or 'mask'")
