"""Outcome reward model losses: Bradley-Terry with optional margin and reward centering.

A reward model maps a (prompt, completion) pair to a scalar ``r``. Trained on preference pairs
(chosen ``c`` preferred over rejected ``r``), the Bradley-Terry model (Bradley & Terry, 1952) says

    P(c > r) = sigmoid(r_c - r_r)

and the loss is the negative log-likelihood of the observed preferences (Ouyang et al. 2022,
"Training language models to follow instructions with human feedback", eq. 1; Stiennon et al. 2020).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bradley_terry_loss", "pairwise_metrics"]


def pairwise_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detached pairwise metrics of a batch of reward pairs.

    - ``accuracy``: fraction of pairs with ``r_c > r_r``; an exact tie counts one half, so an untrained
      model that scores everything the same sits at the 50% chance level rather than at 0%.
    - ``margin``: mean of ``r_c - r_r``.
    - ``chosen_rewards`` / ``rejected_rewards``: mean reward of each side.
    """
    rc = chosen_rewards.detach().float()
    rr = rejected_rewards.detach().float()
    wins = (rc > rr).float() + 0.5 * (rc == rr).float()
    return {
        "accuracy": wins.mean(),
        "margin": (rc - rr).mean(),
        "chosen_rewards": rc.mean(),
        "rejected_rewards": rr.mean(),
    }


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
    num_pairs: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise Bradley-Terry loss for reward models, with optional margin and centering.

    With per-pair rewards ``r_c`` (chosen) and ``r_r`` (rejected), both of shape ``[B]``:

        loss = mean_b[ -log sigmoid(r_c - r_r - m) ]  +  coef * mean_b[ (r_c + r_r)^2 ]

    - ``m`` (``margin``, shape ``[B]``, default 0) is the preference-strength margin of Llama 2
      (Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models", eq. 2): a pair
      rated "significantly better" must be separated by at least ``m`` before its loss saturates.
    - The second term (``coef`` = ``center_rewards_coefficient``, off when ``None`` or 0) is the
      auxiliary centering loss of Eisenstein et al. 2023 ("Helping or Herding? Reward Model Ensembles
      Mitigate but do not Eliminate Reward Hacking"): the Bradley-Terry likelihood only sees
      differences, so it pins the otherwise free offset by pulling each pair's sum toward zero,
      which keeps rewards of different models (or runs) on a comparable, zero-mean scale.

    ``num_pairs`` replaces ``B`` in both means (the pair count of the whole optimizer step under gradient
    accumulation, so each pair weighs the same whatever micro-batch it falls in).

    Returns ``(loss, metrics)``; metrics are detached: ``accuracy``, ``margin`` (mean ``r_c - r_r``),
    ``chosen_rewards``, ``rejected_rewards``, and ``centering_loss`` when centering is on.
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen_rewards {tuple(chosen_rewards.shape)} and rejected_rewards "
            f"{tuple(rejected_rewards.shape)} must have the same shape"
        )
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    denom = diff.new_tensor(float(diff.numel())) if num_pairs is None else torch.as_tensor(num_pairs).to(diff)
    denom = denom.clamp(min=1.0)
    loss = -F.logsigmoid(diff).sum() / denom
    metrics = pairwise_metrics(chosen_rewards, rejected_rewards)
    if center_rewards_coefficient:
        squares = (chosen_rewards + rejected_rewards) ** 2
        loss = loss + center_rewards_coefficient * squares.sum() / denom
        metrics["centering_loss"] = squares.mean().detach().float()
    return loss, metrics
