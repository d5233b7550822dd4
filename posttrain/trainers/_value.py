"""PPO's critic: a sequence-classification model read per token (a value per completion token).

A value model is any one-score sequence-classification model (TRL's convention: ``AutoModelForSequence
Classification(num_labels=1)``, e.g. a trained reward model). Its value of completion token ``t`` is its
head applied to the backbone's hidden state at the position that predicts ``t`` (the state before the
token is chosen), so the values line up with the policy's log-probs. Only the backbone and the ``[H, 1]``
head run: no vocabulary-sized logits. Sequences are packed padding-free in one row, as the log-probs are.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn

from ..data.padding_free import padding_free_row
from ..models import unwrap_model
from ..ops.attention import use_varlen_attention
from ..online.logprobs import completion_mask
from ._reward_heads import as_classifier, disable_dropout, head_name

__all__ = ["completion_values", "default_value_model", "batched_completion_values"]


def default_value_model(policy: nn.Module, reward_model: Any = None) -> nn.Module:
    """A fresh critic: a copy of ``reward_model`` when it is a module on the policy's vocabulary (its backbone
    already reads the task; TRL's recipe), else the policy's backbone with a new one-score head initialized to
    zero (a critic that predicts 0 everywhere adds no noise to the first advantages; the head's gradient is
    not zero, so it learns from the first step, and the backbone from the second)."""
    vocab = getattr(unwrap_model(policy).config, "vocab_size", None)
    if isinstance(reward_model, nn.Module) and getattr(getattr(reward_model, "config", None), "vocab_size", -1) == vocab:
        value = copy.deepcopy(unwrap_model(reward_model))
    else:
        value = as_classifier(copy.deepcopy(unwrap_model(policy)), "seq-cls", 1)
        with torch.no_grad():  # every value starts at 0: no noise in the first advantages, explained variance 0
            for p in getattr(value, head_name(value)).parameters():
                p.zero_()
    value.requires_grad_(True)
    disable_dropout(value)
    use_varlen_attention(value)
    return value


def check_value_model(value_model: nn.Module, policy: nn.Module) -> None:
    """A clear error before training when ``value_model`` cannot give per-token values of the policy's tokens."""
    head_name(value_model)  # raises with what was expected
    base = unwrap_model(value_model)
    if not hasattr(base, base.base_model_prefix):
        raise ValueError(f"value_model {type(base).__name__} has no backbone attribute {base.base_model_prefix!r}")
    mine = getattr(unwrap_model(policy).config, "vocab_size", None)
    theirs = getattr(base.config, "vocab_size", None)
    if mine is not None and theirs is not None and theirs < mine:
        raise ValueError(f"value_model has a vocabulary of {theirs} tokens, the policy {mine}: a critic reads the "
                         "policy's own tokens, so it needs the policy's tokenizer (leave value_model=None to start "
                         "one from the policy)")


def completion_values(value_model: nn.Module, prompt_ids: Sequence[Sequence[int]],
                      completion_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """``[B, Lc]`` float32: the critic's value before each completion token (0 past a completion's end).
    Gradients flow unless called under ``torch.no_grad``."""
    base = unwrap_model(value_model)
    device = next(base.parameters()).device
    row = padding_free_row(prompt_ids, completion_ids, device=device)
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(input_ids=row.input_ids, position_ids=row.position_ids, use_cache=False).last_hidden_state
    predicting = hidden[:, :-1][row.completion_mask[:, 1:]]  # the state that predicts each completion token
    values = getattr(base, head_name(base))(predicting).squeeze(-1).float()
    mask = completion_mask([len(c) for c in completion_ids], device)
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


@torch.no_grad()
def batched_completion_values(value_model: nn.Module, prompt_ids: Sequence[Sequence[int]],
                              completion_ids: Sequence[Sequence[int]], batch_size: int) -> torch.Tensor:
    """`completion_values` without gradients, ``batch_size`` completions per forward, as one ``[N, Lc]``."""
    width = max([len(c) for c in completion_ids] + [1])
    out = torch.zeros(len(completion_ids), width, device=next(value_model.parameters()).device)
    for start in range(0, len(completion_ids), batch_size):
        part = completion_values(value_model, prompt_ids[start:start + batch_size], completion_ids[start:start + batch_size])
        out[start:start + part.shape[0], :part.shape[1]] = part
    return out
