"""Knowledge-distillation losses: generalized JSD (GKD, on-policy distillation) and MiniLLM's objective.

Notation: per completion token ``t``, ``q_t = softmax(z_S,t / T)`` is the student's next-token distribution
and ``p_t = softmax(z_T,t / T)`` the teacher's, both over the same vocabulary, ``T`` the temperature.

**Generalized JSD** (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", the GKD paper), with ``m = beta * p + (1 - beta) * q``::

    JSD_beta(p || q) = beta * KL(p || m) + (1 - beta) * KL(q || m)

``beta = 0`` is read as the forward KL ``KL(p || q)`` and ``beta = 1`` as the reverse KL ``KL(q || p)`` (the
limits of ``JSD_beta / beta`` and ``JSD_beta / (1 - beta)``; the plain formula is 0 at both ends), as the
paper's experiments and TRL do. The per-token values are computed from hidden states and output heads in
chunks by `posttrain.ops.divergences.chunked_divergence` (no ``[B, L, V]`` logits); here they are reduced
(`distillation_loss`). `generalized_jsd_loss` is the same divergence from logits a caller already holds
(TRL's ``GKDTrainer.generalized_jsd_loss``).

**Vocabulary padding**: models that share a tokenizer often have embedding matrices of different sizes
(rounded up to a multiple of 64 or 128); the extra rows are ids no tokenizer produces. Both distributions are
taken over the first ``V = min(V_S, V_T)`` ids (`shared_vocab_logits`), so they are comparable and normalized
over the same support; an id the tokenizer can produce is never dropped (the teacher loader checks that).

**MiniLLM** (Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models"): minimize the
sequence-level reverse KL ``KL(q(y|x) || p(y|x))`` by policy gradient on the student's own samples. Per
token, the reward is ``r_t = log p(y_t | y_<t, x) - log q(y_t | y_<t, x)`` (detached). The return of token
``t`` is the discounted sum of the rewards after it (with ``single_step``) or from it on (without)::

    R_t = sum_{t' in S_t} gamma^(t' - t) r_t'      S_t = {t' > t} (single step) or {t' >= t}

divided, with ``length_normalization``, by ``sum_{t' in S_t} gamma^(t' - t)`` (the paper's length
normalization: a mean over the remaining tokens, so long samples do not get larger returns; ``0^0 = 1``).
With ``single_step`` (the paper's single-step decomposition) the current token's part is taken exactly, over
the whole vocabulary: the loss adds ``KL(q_t || p_t)`` at every token (chunked, with gradient), which has
far lower variance than its sampled estimate. The baseline is GRPO-style: the mean return over the group of
completions of the same prompt (every token of every completion in the group), subtracted from every token;
rewards from extra reward functions enter as group-relative sequence advantages added to every token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .advantages import group_relative_advantages
from .policy_gradient import LossType, aggregate_token_loss, clip_metrics, clipped_objective, masked_mean

__all__ = ["generalized_jsd", "generalized_jsd_loss", "shared_vocab_logits", "distillation_loss",
           "minillm_returns", "minillm_advantages", "minillm_loss"]


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {beta}")


def shared_vocab_logits(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Both logits cut to the first ``min(V_S, V_T)`` ids (the padding rows of the larger embedding dropped)."""
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :v], teacher_logits[..., :v]


def generalized_jsd(student_logps: Tensor, teacher_logps: Tensor, beta: float = 0.5) -> Tensor:
    """Per-position generalized JSD ``[...]`` from full log-distributions ``[..., V]`` (module docstring)."""
    _check_beta(beta)
    q_log, p_log = student_logps, teacher_logps
    if beta == 0.0:
        return (p_log.exp() * (p_log - q_log)).sum(-1)
    if beta == 1.0:
        return (q_log.exp() * (q_log - p_log)).sum(-1)
    m_log = torch.logaddexp(p_log + math.log(beta), q_log + math.log1p(-beta))
    return beta * (p_log.exp() * (p_log - m_log)).sum(-1) + (1 - beta) * (q_log.exp() * (q_log - m_log)).sum(-1)


def generalized_jsd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None,
                         beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean") -> Tensor:
    """Generalized JSD between student and teacher logits ``[B, L, V]`` (vocabularies cut to the shared part).

    ``labels [B, L]``: positions equal to -100 are left out. ``reduction``: ``"batchmean"`` / ``"mean"``
    (mean over the counted positions), ``"sum"``, or ``"none"`` (``[B, L]``, 0 where left out). This holds
    the full logits it is given; the trainers use the chunked op instead.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    zs, zt = shared_vocab_logits(student_logits, teacher_logits)
    values = generalized_jsd(torch.log_softmax(zs.float() / temperature, -1),
                             torch.log_softmax(zt.float() / temperature, -1), beta)
    mask = torch.ones_like(values, dtype=torch.bool) if labels is None else labels != -100
    values = values * mask
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if reduction in ("batchmean", "mean"):
        return values.sum() / mask.sum().clamp(min=1)
    raise ValueError(f"reduction must be 'batchmean', 'mean', 'sum' or 'none', got {reduction!r}")


def distillation_loss(divergence: Tensor, mask: Tensor,
                      num_items_in_batch: float | Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Token mean of per-token divergences ``[B, Lc]`` over the loss tokens::

        loss = sum_{b,t} mask_{b,t} * D_{b,t} / N

    ``N`` is ``num_items_in_batch`` (the optimizer step's loss tokens over every micro-batch and process, as
    the online loop hands it) or the local count, so gradient accumulation does not change the loss.
    Metrics: ``divergence`` (the local per-token mean, detached).
    """
    loss = aggregate_token_loss(divergence, mask, "dapo", num_items_in_batch=num_items_in_batch)
    return loss, {"divergence": masked_mean(divergence.detach(), mask)}


def minillm_returns(rewards: Tensor, mask: Tensor, *, gamma: float = 0.0, single_step: bool = True,
                    length_normalization: bool = True) -> Tensor:
    """Per-token returns ``R [B, Lc]`` from per-token rewards (module docstring), 0 outside ``mask``.

    Written as a reverse scan, so it costs ``O(B * Lc)``.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    maskf = mask.to(torch.float64)
    r = rewards.detach().to(torch.float64) * maskf
    total = torch.zeros_like(r)
    weight = torch.zeros_like(r)
    acc_r = r.new_zeros(r.shape[0])
    acc_w = r.new_zeros(r.shape[0])
    for t in range(r.shape[1] - 1, -1, -1):
        # acc_* hold the sums over t' > t, discounted to t + 1
        after_r, after_w = gamma * acc_r, gamma * acc_w
        if single_step:
            total[:, t], weight[:, t] = after_r, after_w
        else:
            total[:, t], weight[:, t] = r[:, t] + after_r, maskf[:, t] + after_w
        acc_r, acc_w = r[:, t] + after_r, maskf[:, t] + after_w
    if length_normalization:
        total = torch.where(weight > 0, total / weight.clamp(min=1e-12), torch.zeros_like(total))
    return (total * maskf).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def minillm_advantages(teacher_logps: Tensor, student_logps: Tensor, mask: Tensor, num_generations: int, *,
                       gamma: float = 0.0, single_step: bool = True, length_normalization: bool = True,
                       rewards: Tensor | None = None, scale_rewards: str = "group",
                       rkl_advantage: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """MiniLLM's per-token advantages ``[B, Lc]`` (module docstring): returns of ``r_t = log p - log q``
    minus the group's mean return, plus the group-relative advantage of the extra ``rewards [B]`` (if any).
    ``rkl_advantage=False`` (TRL's switch) leaves the reverse-KL returns out: the advantage is the extra
    rewards' alone (zero without them), and the teacher then teaches only through the single-step term of
    `minillm_loss`. The metrics are computed either way.

    Completions of one prompt are the ``num_generations`` consecutive rows. Metrics: ``rkl_reward`` (mean
    ``r_t``, i.e. minus the per-token sampled reverse KL) and ``rkl_return`` (mean return).
    """
    if mask.shape[0] % num_generations:
        raise ValueError(f"{mask.shape[0]} completions are not whole groups of num_generations={num_generations}")
    maskf = mask.to(torch.float32)
    r = (teacher_logps.detach().float() - student_logps.detach().float()) * maskf
    ret = minillm_returns(r, mask, gamma=gamma, single_step=single_step, length_normalization=length_normalization)
    adv = ret.clone()
    if not rkl_advantage:
        adv = torch.zeros_like(ret)
    elif num_generations > 1:
        g = num_generations
        group_sum = (ret * maskf).view(-1, g, ret.shape[1]).sum((1, 2))
        group_count = maskf.view(-1, g, ret.shape[1]).sum((1, 2)).clamp(min=1.0)
        baseline = (group_sum / group_count).repeat_interleave(g)
        adv = (ret - baseline[:, None]) * maskf
    if rewards is not None:
        seq_adv, _ = group_relative_advantages(rewards, num_generations, scale_rewards if num_generations > 1 else "none")
        if num_generations == 1:
            seq_adv = rewards.float()
        adv = adv + seq_adv[:, None].to(adv.dtype) * maskf
    return adv, {"rkl_reward": masked_mean(r, maskf), "rkl_return": masked_mean(ret, maskf)}


def minillm_loss(logps: Tensor, advantages: Tensor, mask: Tensor, *, old_logps: Tensor | None = None,
                 single_step_kl: Tensor | None = None, epsilon: float = 0.2, epsilon_high: float | None = None,
                 loss_type: LossType = "dapo", max_completion_length: int | None = None,
                 num_items_in_batch: float | Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """MiniLLM's loss: the clipped policy gradient with per-token advantages, plus the single-step term::

        l_t = -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps_high) A_t) + KL(q_t || p_t)

    ``rho_t = exp(logp_t - old_logp_t)`` (1 with no ``old_logps``: the plain policy gradient); ``KL(q_t || p_t)``
    is ``single_step_kl [B, Lc]`` (with gradient; omitted when None). Reduced by `aggregate_token_loss`
    (``loss_type``; DAPO's global token mean by default). Metrics: ``pg_loss``, ``single_step_kl`` and
    ``clip_ratio/*``.
    """
    maskf = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    adv = advantages.to(logps.dtype)
    pg = -clipped_objective(ratio, adv, epsilon, epsilon_high)
    per_token = pg if single_step_kl is None else pg + single_step_kl
    loss = aggregate_token_loss(per_token, maskf, loss_type, max_completion_length=max_completion_length,
                                num_items_in_batch=num_items_in_batch)
    metrics = {"pg_loss": masked_mean(pg.detach(), maskf)}
    if single_step_kl is not None:
        metrics["single_step_kl"] = masked_mean(single_step_kl.detach(), maskf)
    metrics.update(clip_metrics(ratio, adv, maskf, epsilon, epsilon_high))
    return loss, metrics
