"""Underlying Distribution Matching (UDM) for BCO: prompt density-ratio weights for undesirable examples.

Jung et al. 2024 (arXiv:2404.04656, Sec. 4) re-weight each undesirable example by ``p_D(x) / p_U(x)``, the
density ratio of its prompt under the desirable and the undesirable prompt distributions, so that both
classes are judged on the same prompts. The ratio comes from a probabilistic classifier ``P(D | x)`` on
prompt embeddings (class-balanced logistic regression, fitted here with L-BFGS in torch):
``w(x) = clamp(P(D|x) / (1 - P(D|x)), min_ratio, max_ratio)``.
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

import torch

from ..losses.bco import udm_density_ratio

EmbeddingFunc = Callable[[Sequence[str]], torch.Tensor]

__all__ = ["EmbeddingFunc", "fit_prompt_classifier", "mean_token_embedder", "udm_weights"]


def mean_token_embedder(model: torch.nn.Module, tokenizer) -> EmbeddingFunc:
    """Default prompt embedding: the mean of the model's input token embeddings over the prompt (no forward)."""
    table = model.get_input_embeddings().weight

    @torch.no_grad()
    def embed(texts: Sequence[str]) -> torch.Tensor:
        out = []
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] or [tokenizer.pad_token_id]
            out.append(table[torch.tensor(ids, device=table.device)].float().mean(0))
        return torch.stack(out).cpu()

    return embed


def fit_prompt_classifier(desirable: torch.Tensor, undesirable: torch.Tensor, *, l2: float = 1e-3,
                          max_iter: int = 200) -> Callable[[torch.Tensor], torch.Tensor]:
    """Class-balanced L2 logistic regression ``P(D | e)`` on embeddings; returns ``e [N, D] -> P(D|e) [N]``."""
    x = torch.cat([desirable, undesirable]).double()
    y = torch.cat([torch.ones(len(desirable)), torch.zeros(len(undesirable))]).double()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-8)
    x = (x - mean) / std
    weight = torch.where(y > 0, 0.5 / max(len(desirable), 1), 0.5 / max(len(undesirable), 1))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (weight * torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none")).sum()
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_, b_ = w.detach(), b.detach()
    return lambda e: torch.sigmoid(((e.double() - mean) / std) @ w_ + b_).float()


def udm_weights(prompts: Sequence[str], labels: Sequence[bool], embed: EmbeddingFunc, *, sample_size: int = 1024,
                min_ratio: float = 0.5, max_ratio: float = 10.0, seed: int = 0, batch_size: int = 64) -> list[float]:
    """Weight per row: 1 for desirable rows, the clamped density ratio of the prompt for undesirable rows.

    The classifier is fitted on up to ``sample_size`` prompts of each class (sampled with ``seed``).
    """
    rng = random.Random(seed)
    pos = [i for i, lab in enumerate(labels) if lab]
    neg = [i for i, lab in enumerate(labels) if not lab]
    if not pos or not neg:
        return [1.0] * len(labels)

    def embed_rows(rows: Sequence[int]) -> torch.Tensor:
        return torch.cat([embed([prompts[i] for i in rows[s:s + batch_size]]).float()
                          for s in range(0, len(rows), batch_size)])

    clf = fit_prompt_classifier(embed_rows(rng.sample(pos, min(sample_size, len(pos)))),
                                embed_rows(rng.sample(neg, min(sample_size, len(neg)))))
    ratio = udm_density_ratio(clf(embed_rows(neg)), min_ratio=min_ratio, max_ratio=max_ratio)
    out = [1.0] * len(labels)
    for i, r in zip(neg, ratio.tolist()):
        out[i] = r
    return out
