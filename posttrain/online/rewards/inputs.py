"""How a reward model sees its input: one encoding shared by training and scoring.

`RewardTrainer`/`PRMTrainer` (trainers/) tokenize their datasets with these functions and
`RewardModelScorer` (online/rewards/reward_model.py) tokenizes fresh completions with the same ones, so a trained
reward model scores at inference exactly what it was trained on.

Two kinds of backbone:
- decoder (causal LM) tokenizers: the prompt (plain text with the tokenizer's special tokens, or a
  conversation rendered with the chat template and the generation prompt) followed by the completion
  and EOS (plain) or the assistant turn through its end-of-turn marker (conversational), via
  `posttrain.data.tokenize_prompt_completion`. A sequence-classification head reads the last non-pad token.
- encoder tokenizers (BERT-like: a CLS and a SEP token): a text pair `[CLS] prompt [SEP] completion [SEP]`
  (conversations: the whole rendered chat as one text), which is how cross-encoders are trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...data import render_chat, tokenize_prompt_completion

__all__ = [
    "is_conversation",
    "is_encoder_tokenizer",
    "as_assistant_turn",
    "encode_outcome",
    "encode_steps",
    "separator_ids",
    "split_steps",
    "pad_right",
]

IGNORE_INDEX = -100


def is_conversation(value: Any) -> bool:
    """A list of `{"role", "content"}` message dicts."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], dict)


def is_encoder_tokenizer(tokenizer: Any) -> bool:
    """BERT-like tokenizers (with CLS and SEP tokens) get text-pair encoding; everything else is a decoder."""
    return getattr(tokenizer, "cls_token_id", None) is not None and getattr(tokenizer, "sep_token_id", None) is not None


def as_assistant_turn(completion: Any) -> list[dict[str, Any]]:
    """A completion as a list of messages: a string becomes one assistant message."""
    if is_conversation(completion):
        return list(completion)
    return [{"role": "assistant", "content": str(completion)}]


def _prompt_text_for_encoder(tokenizer: Any, prompt: Any, completion: Any,
                             tools: Any = None) -> tuple[str, str | None]:
    if is_conversation(prompt):
        return render_chat(tokenizer, list(prompt) + as_assistant_turn(completion), tools=tools), None
    return str(prompt), completion if isinstance(completion, str) else _join_contents(completion)


def _join_contents(messages: Any) -> str:
    return "".join(str(m.get("content") or "") for m in messages)


def encode_outcome(tokenizer: Any, prompt: Any, completion: Any, *, max_length: int | None = None,
                   tools: Any = None) -> dict[str, Any]:
    """Token ids of one (prompt, completion) pair for an outcome reward model: `{"input_ids", "truncated"}`.

    `tools` (tool schemas: a list of dicts or a JSON string) are rendered by the chat template of a
    conversational pair, as in the policy's training; plain-text pairs have no template to render them.

    An empty prompt (``""`` or ``[]``) scores the completion alone. Truncation to `max_length` keeps the
    end of the completion visible where it can: a decoder prompt keeps its last
    ``max(max_length - len(completion), max_length // 2)`` tokens and the completion is then cut on the
    right; an encoder pair is truncated longest-first by the tokenizer (CLS/SEP kept).
    """
    if is_encoder_tokenizer(tokenizer):
        first, second = _prompt_text_for_encoder(tokenizer, prompt, completion, tools)
        if second is not None and not first:
            first, second = second, None
        enc = tokenizer(first, second, add_special_tokens=True)
        full = len(enc["input_ids"])
        if max_length is not None and full > max_length:
            enc = tokenizer(first, second, add_special_tokens=True, truncation="longest_first", max_length=max_length)
        return {"input_ids": list(enc["input_ids"]), "truncated": max_length is not None and full > max_length}
    if is_conversation(prompt) or (isinstance(prompt, (list, tuple)) and not prompt and is_conversation(completion)):
        out = tokenize_prompt_completion(tokenizer, list(prompt), as_assistant_turn(completion), tools=tools)
    else:
        text = completion if isinstance(completion, str) else _join_contents(completion)
        out = tokenize_prompt_completion(tokenizer, str(prompt) if prompt else "", text)
    prompt_ids, completion_ids = list(out["prompt_ids"]), list(out["completion_ids"])
    truncated = max_length is not None and len(prompt_ids) + len(completion_ids) > max_length
    if truncated:
        keep = min(len(prompt_ids), max(max_length - len(completion_ids), max_length // 2))
        prompt_ids = prompt_ids[len(prompt_ids) - keep:] if keep else []
        completion_ids = completion_ids[: max_length - len(prompt_ids)]
    return {"input_ids": prompt_ids + completion_ids, "truncated": truncated}


def separator_ids(tokenizer: Any, separator: str) -> list[int]:
    """Token ids of the step separator. A separator an encoder tokenizer reduces to nothing (whitespace
    such as "\\n" in BERT) becomes its SEP token; a decoder separator that tokenizes to nothing is an error."""
    ids = list(tokenizer(separator, add_special_tokens=False)["input_ids"])
    if ids:
        return ids
    if is_encoder_tokenizer(tokenizer):
        return [tokenizer.sep_token_id]
    raise ValueError(f"step_separator {separator!r} tokenizes to no tokens with this tokenizer; choose another")


def _prompt_ids(tokenizer: Any, prompt: Any) -> list[int]:
    if is_conversation(prompt):
        text = render_chat(tokenizer, list(prompt), add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=is_encoder_tokenizer(tokenizer))["input_ids"])
    if not prompt:
        return [tokenizer.cls_token_id] if is_encoder_tokenizer(tokenizer) else []
    return list(tokenizer(str(prompt))["input_ids"])


def encode_steps(
    tokenizer: Any,
    prompt: Any,
    steps: Sequence[str],
    *,
    separator: str = "\n",
    labels: Sequence[bool] | None = None,
    max_length: int | None = None,
    max_completion_length: int | None = None,
) -> dict[str, Any]:
    """Token ids of a stepwise solution for a process reward model.

    Layout: ``prompt_ids + step_1 + sep + step_2 + sep + ... + step_n + sep``, each step and the separator
    tokenized on their own, so the separator is always whole tokens. The score of step ``k`` is read at the
    last token of the separator that follows it. Returns ``{"input_ids", "step_positions", "truncated"}``
    and, with `labels`, a per-token ``"labels"`` list (1/0 at step positions, -100 elsewhere). With
    `max_length` the sequence keeps its first `max_length` tokens, and with `max_completion_length` the steps
    (all after the prompt) keep their first `max_completion_length` tokens (cut first, as TRL's PRMTrainer
    does); steps cut off lose their position.
    """
    if labels is not None and len(labels) != len(steps):
        raise ValueError(f"{len(labels)} labels for {len(steps)} steps")
    sep = separator_ids(tokenizer, separator)
    ids = _prompt_ids(tokenizer, prompt)
    prompt_end = len(ids)
    positions = []
    for step in steps:
        ids += list(tokenizer(step, add_special_tokens=False)["input_ids"]) + sep
        positions.append(len(ids) - 1)
    limit = max_length
    if max_completion_length is not None:
        limit = prompt_end + max_completion_length if limit is None else min(limit, prompt_end + max_completion_length)
    truncated = limit is not None and len(ids) > limit
    if truncated:
        ids = ids[:limit]
        positions = [p for p in positions if p < limit]
    out: dict[str, Any] = {"input_ids": ids, "step_positions": positions, "truncated": truncated}
    if labels is not None:
        token_labels = [IGNORE_INDEX] * len(ids)
        for p, label in zip(positions, labels):
            token_labels[p] = int(bool(label))
        out["labels"] = token_labels
    return out


def split_steps(text: str, separator: str = "\n") -> list[str]:
    """Split a generated solution into steps: pieces between separators, blank pieces dropped.
    A completion with no non-blank piece is one empty step, so it still gets a score."""
    steps = [s for s in text.split(separator) if s.strip()]
    return steps or [""]


def pad_right(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into `(input_ids [N, L], attention_mask [N, L])`."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
    return input_ids, attention_mask
