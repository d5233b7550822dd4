"""Supervised fine-tuning losses: token-level negative log-likelihood and its DFT variant.

Per-token log-probs ``logps[b, t] = log pi(y_t | y_<t)`` and a loss mask (both ``[B, L]``, aligned with
``input_ids`` as in docs/internals.md) come in; ``(loss, metrics)`` goes out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["sft_loss", "token_accuracy"]

NORMALIZATIONS = ("tokens", "sequence")


def _sequence_ids(mask: Tensor, seq_lens: Sequence[int] | None) -> tuple[Tensor, int]:
    """Sequence index of every position ``[B, L]`` and the number of sequences.

    One sequence per row, or, for a padding-free row ``[1, T]``, the boundaries from ``seq_lens``
    (trailing positions past ``sum(seq_lens)`` get the index ``len(seq_lens)``, outside every sequence).
    """
    if seq_lens is None:
        b, length = mask.shape
        return torch.arange(b, device=mask.device)[:, None].expand(b, length), b
    if mask.shape[0] != 1 or sum(seq_lens) > mask.shape[1]:
        raise ValueError(f"seq_lens (sum {sum(seq_lens)}) must describe a padding-free row [1, T], "
                         f"got mask of shape {tuple(mask.shape)}")
    lens = torch.as_tensor(list(seq_lens), device=mask.device)
    ids = torch.repeat_interleave(torch.arange(len(lens), device=mask.device), lens)
    ids = torch.cat([ids, ids.new_full((mask.shape[1] - ids.numel(),), len(lens))])
    return ids[None], len(lens)


def sft_loss(logps: Tensor, mask: Tensor, *, dft: bool = False, normalize: str = "tokens",
             num_items: float | Tensor | None = None,
             seq_lens: Sequence[int] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Negative log-likelihood of the masked tokens, optionally with DFT's probability weighting.

    Per token, with ``m_t`` the mask::

        SFT:  l_t = -log pi(y_t | y_<t)
        DFT:  l_t = -sg(pi(y_t | y_<t)) * log pi(y_t | y_<t)

    SFT is plain maximum likelihood on demonstrations. DFT ("Dynamic Fine-Tuning", Wu et al. 2025, "On the
    Generalization of SFT: A Reinforcement Learning Perspective with Reward Rectification") reads the SFT
    gradient as a policy gradient whose implicit reward is ``1 / pi``; multiplying each token's loss by its
    stop-gradient (``sg``) probability cancels that ill-posed weight, which the paper finds generalizes better.

    Reduction:
        ``normalize="tokens"``:   ``loss = sum_t m_t l_t / sum_t m_t`` (mean over all masked tokens), or
        ``/ num_items`` when given (the global token count under gradient accumulation / data parallel).
        ``normalize="sequence"``: mean over sequences of each sequence's mean ``l_t``; sequences are rows,
        or the ``seq_lens`` segments of a padding-free row; ``num_items`` then replaces the sequence count.

    Returns:
        ``loss`` (scalar) and detached metrics: ``nll`` (mean NLL per masked token), ``mean_token_prob``,
        ``num_tokens``.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if logps.shape != mask.shape:
        raise ValueError(f"logps {tuple(logps.shape)} and mask {tuple(mask.shape)} must have the same shape")
    m = mask.to(logps.dtype)
    nll = -logps
    per_token = nll * logps.detach().exp() if dft else nll
    per_token = per_token * m
    n_tok = m.sum()
    if normalize == "tokens":
        denom = num_items if num_items is not None else n_tok.clamp(min=1.0)
        loss = per_token.sum() / denom
    else:
        seq_ids, n_seq = _sequence_ids(mask, seq_lens)
        flat_ids = seq_ids.reshape(-1)
        seq_sum = logps.new_zeros(n_seq + 1).index_add(0, flat_ids, per_token.reshape(-1))[:n_seq]
        seq_cnt = logps.new_zeros(n_seq + 1).index_add(0, flat_ids, m.reshape(-1))[:n_seq]
        has_tokens = seq_cnt > 0
        seq_mean = seq_sum / seq_cnt.clamp(min=1.0)
        denom = num_items if num_items is not None else has_tokens.sum().clamp(min=1)
        loss = (seq_mean * has_tokens).sum() / denom
    with torch.no_grad():
        safe = n_tok.clamp(min=1.0)
        metrics = {
            "nll": (nll * m).sum() / safe,
            "mean_token_prob": (logps.exp() * m).sum() / safe,
            "num_tokens": n_tok,
        }
    return loss, metrics


@torch.no_grad()
def token_accuracy(argmax: Tensor, input_ids: Tensor, mask: Tensor) -> Tensor:
    """Fraction of masked positions where the model's most likely token equals the actual token.

    ``argmax[b, t]`` is the prediction for position ``t`` (made at ``t - 1``), as returned by
    ``token_logps(..., with_argmax=True)``; all three tensors are ``[B, L]``.
    """
    m = mask.to(torch.bool)
    correct = (argmax == input_ids) & m
    return correct.sum().float() / m.sum().clamp(min=1).float()
