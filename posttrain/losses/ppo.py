"""PPO with a learned critic (actor-critic) and REINFORCE++: per-token rewards, advantages and both losses.

Every tensor is ``[B, L]`` completion-aligned (row ``b`` holds completion ``b``'s tokens left-aligned,
``mask`` marks them), the layout of `posttrain.online.rollout_batch.RolloutBatch`. The pieces, in the
order a PPO step uses them (Ouyang et al. 2022, "Training language models to follow instructions with
human feedback"; Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"):

- `token_rewards`: ``-kl_coef * KL_t`` on every token, the sequence score added at the last token;
- `gae_advantages`: generalized advantage estimation and the value targets (returns);
- `masked_whiten`: whitening over the completion tokens (advantages; optionally rewards);
- `ppo_policy_loss`: the clipped surrogate, with optional dual clip;
- `ppo_value_loss`: the clipped squared error of the critic;
- `reinforce_pp_advantages`: REINFORCE++'s critic-free advantages (returns-to-go, globally normalized);
- `explained_variance`: how much of the returns' variance the critic explains.
"""

from __future__ import annotations

import torch

from .policy_gradient import k3_kl, masked_mean

__all__ = ["KL_ESTIMATORS", "explained_variance", "gae_advantages", "group_mean_baseline", "masked_var",
           "masked_whiten", "ppo_policy_loss", "ppo_value_loss", "reinforce_pp_advantages", "token_kl",
           "token_rewards"]

KL_ESTIMATORS = ("k1", "k3")


def _last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of each row's last masked token (-1 for an empty row)."""
    return mask.to(torch.long).sum(-1) - 1


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over the masked entries, Bessel-corrected when ``unbiased`` (0 with < 2 entries)."""
    mask = mask.to(values.dtype)
    count = mask.sum()
    mean = (values * mask).sum() / count.clamp(min=1.0)
    sq = (((values - mean) * mask) ** 2).sum()
    denom = (count - 1.0) if unbiased else count
    return torch.where(denom > 0, sq / denom.clamp(min=1.0), torch.zeros_like(sq))


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whiten over the masked entries of the whole batch::

        w = (x - mean) / sqrt(var + eps)                 (shift_mean=True)
        w = (x - mean) / sqrt(var + eps) + mean          (shift_mean=False)

    ``shift_mean=True`` (advantages) centres and scales; ``shift_mean=False`` (rewards, ``whiten_rewards``)
    rescales and keeps the mean. Unbiased variance; entries outside ``mask`` become 0.
    """
    m = mask.to(values.dtype)
    mean = (values * m).sum() / m.sum().clamp(min=1.0)
    scaled = (values - mean) * torch.rsqrt(masked_var(values, m) + eps)
    if not shift_mean:
        scaled = scaled + mean
    return scaled * m


def token_kl(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate of ``KL(pi || pi_ref)`` on tokens sampled from ``pi`` (Schulman 2020,
    "Approximating KL Divergence"): ``k1 = logp - ref_logp`` (unbiased, can be negative) or
    ``k3 = exp(ref - logp) - (ref - logp) - 1`` (unbiased, non-negative, lower variance)."""
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k3":
        return k3_kl(logps, ref_logps)
    raise ValueError(f"kl_estimator={estimator!r}: expected one of {KL_ESTIMATORS}")


def token_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RLHF's per-token reward (Ziegler et al. 2019; Ouyang et al. 2022)::

        r_t = -kl_coef * KL_t + score * [t == last token]

    ``scores [B]`` are the sequence rewards, ``logps`` the sampling policy's log-probs, ``ref_logps`` the
    reference's (``None``: no KL term). Returns ``(rewards [B, L], kl [B, L], non_score_reward [B, L])``,
    zero outside ``mask``; ``non_score_reward = -kl_coef * kl``.
    """
    m = mask.to(logps.dtype)
    if ref_logps is None:
        kl = torch.zeros_like(logps)
    else:
        kl = token_kl(logps.detach(), ref_logps.detach(), kl_estimator) * m
    non_score = -kl_coef * kl
    rewards = non_score.clone()
    last = _last_token_index(mask)
    rows = (last >= 0).nonzero().flatten()
    rewards[rows, last[rows]] += scores.to(rewards.dtype)[rows]
    return rewards, kl, non_score


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation")::

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                          (the value targets)

    where ``V_{t+1}`` and ``A_{t+1}`` are 0 past a completion's last token (the episode ends there, so
    nothing after it is bootstrapped). ``lam=1`` gives Monte-Carlo returns minus ``V``, ``lam=0`` one-step
    TD errors. Returns ``(advantages, returns)``, ``[B, L]``, zero outside ``mask``; no gradient.
    """
    m = mask.to(values.dtype)
    rewards, values = rewards.detach() * m, values.detach() * m
    length = rewards.shape[1]
    advantages = torch.zeros_like(values)
    next_adv = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = adv
        next_adv, next_value = adv, values[:, t]
    return advantages, (advantages + values) * m


def reinforce_pp_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ advantages (Hu et al. 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning
    Large Language Models"): no critic; each token's return-to-go, normalized over the *global* batch::

        G_t = sum_{s >= t} gamma^(s - t) r_s           (r: `token_rewards`, KL per token + score at the end)
        A_t = (G_t - mean(G)) / std(G)                 (mean, std over every completion token of the batch)

    Normalizing over the batch rather than per prompt is the paper's point: it keeps the estimator stable
    without the per-prompt bias of group normalization. For "REINFORCE++-baseline" centre the scores per
    prompt first (`group_mean_baseline`). Returns ``(advantages, returns)``, zero outside ``mask``.
    """
    m = mask.to(rewards.dtype)
    rewards = rewards.detach() * m
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * m[:, t]
        returns[:, t] = running
    advantages = masked_whiten(returns, m) if normalize else returns
    return advantages, returns


def group_mean_baseline(scores: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Scores minus their prompt's mean score (``scores [N]`` grouped by prompt, ``num_generations`` each):
    the baseline of REINFORCE++-baseline (Hu et al. 2025), applied before the per-token KL is added."""
    if scores.dim() != 1 or scores.numel() % num_generations:
        raise ValueError(f"{scores.numel()} scores cannot be split into groups of num_generations={num_generations}")
    grouped = scores.detach().float().view(-1, num_generations)
    return (grouped - grouped.mean(dim=1, keepdim=True)).flatten()


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped policy loss (Schulman et al. 2017), token mean over the batch::

        r_t = exp(logp_t - old_logp_t)
        l_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps, 1 + eps))
        l_t = min(l_t, -c A_t)   where A_t < 0          (dual clip, c = dual_clip > 1; Ye et al. 2020,
                                                         "Mastering Complex Control in MOBA Games with Deep RL")
        L   = masked_mean(l)

    Dual clip bounds the loss of a negative-advantage token whose ratio has grown huge. Metrics (TRL's
    names without the ``policy/`` prefix): ``approxkl`` ``0.5 * mean((logp - old)^2)``, ``clipfrac`` (share
    of tokens where the clipped term is taken), ``ratio``.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip={dual_clip}: expected a constant > 1 (or None)")
    log_ratio = logps - old_logps.detach()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        per_token = torch.where(adv < 0, torch.minimum(per_token, -dual_clip * adv), per_token)
    loss = masked_mean(per_token, mask)
    metrics = {
        "approxkl": 0.5 * masked_mean(log_ratio.detach() ** 2, mask),
        "clipfrac": masked_mean((clipped > unclipped).float(), mask),
        "ratio": masked_mean(ratio.detach(), mask),
    }
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The critic's clipped squared error (PPO2's value clipping, Schulman et al. 2017 baselines)::

        v_clip = old_v + clip(v - old_v, -eps_v, eps_v)
        L      = 0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2))

    Metrics: ``clipfrac`` (share of tokens where the clipped error is the larger).
    """
    old, target = old_values.detach(), returns.detach()
    clipped = old + (values - old).clamp(-cliprange_value, cliprange_value)
    err, err_clipped = (values - target) ** 2, (clipped - target) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    return loss, {"clipfrac": masked_mean((err_clipped > err).float(), mask)}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(R - V) / Var(R)`` over the masked tokens: 1 for a perfect critic, 0 for one that predicts
    the mean, negative for worse (NaN when the returns do not vary)."""
    var = masked_var(returns.detach(), mask)
    resid = masked_var((returns - values).detach(), mask)
    return torch.where(var > 0, 1.0 - resid / var.clamp(min=1e-12), torch.full_like(var, float("nan")))
