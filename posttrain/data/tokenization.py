"""Tokenization with loss masks, for plain-text and conversational rows.

`tokenize_messages` masks exactly what the assistant says: for every assistant turn its content and its
end-of-turn marker, never the role header before it nor the whitespace after it. It works for any chat
template that renders prefixes consistently, without `{% generation %}` markers:

1. render the full conversation once;
2. for each assistant message i, the turn starts where `render(messages[:i], add_generation_prompt=True)`
   ends and stops where `render(messages[:i+1])` ends (trailing whitespace dropped), both prefixes of the
   full text (else the template is not prefix-consistent and we raise);
3. tokenize the full text once with offsets and mask the tokens that overlap a span (a token straddling
   the span's start, like BPE's " Hello" after a header, counts: every character of the turn is trained on).

Each function takes an optional `max_length` (keep the first `max_length` tokens) and returns a `truncated`
flag, so callers can count and report truncated rows.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from transformers import PreTrainedTokenizerBase

from .templates import render_chat


def _require_offsets(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: assistant masks need return_offsets_mapping; "
            "load the tokenizer with use_fast=True"
        )


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: completions and texts must end with one")
    return tokenizer.eos_token_id


def _truncate(ids: dict[str, list], max_length: int | None) -> dict[str, Any]:
    """Cut every list to the same budget; one budget for the concatenation of the lists, in order."""
    total = sum(len(v) for v in ids.values())
    out: dict[str, Any] = {}
    budget = max_length if max_length is not None else total
    for key, value in ids.items():
        out[key] = value[: max(budget, 0)]
        budget -= len(out[key])
    out["truncated"] = max_length is not None and total > max_length
    return out


def assistant_char_spans(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    full_text: str,
    tools: list[dict] | None = None,
) -> list[tuple[int, int]]:
    """Character spans `[start, end)` of every assistant turn (content + end-of-turn marker) in `full_text`."""
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        through = render_chat(tokenizer, messages[: i + 1], tools=tools)
        if not (full_text.startswith(before) and full_text.startswith(through) and through.startswith(before)):
            raise ValueError(
                f"the chat template does not render prefix-consistently at message {i} (an assistant turn): the "
                "conversation up to it, rendered with add_generation_prompt=True, and the conversation through it "
                "must both be prefixes of the full rendering. Use a template that does (e.g. "
                "posttrain.data.ensure_chat_template(tokenizer, 'chatml')) or edit this one."
            )
        start = len(before)
        end = max(start, len(through.rstrip()))
        if end > start:
            spans.append((start, end))
    return spans


def _mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for every token that overlaps a span. A token straddling a span edge (BPE merged a header's last
    character with the content's first, or a leading space: " Hello") counts, so every character of the
    assistant turn is trained on. A zero-width token (offsets trimmed off a whitespace-only token) at
    position p counts when start < p <= end."""
    starts = [s for s, _ in spans]
    mask = [0] * len(offsets)
    for t, (ts, te) in enumerate(offsets):
        k = bisect_left(starts, te) - 1  # the last span starting before the token ends
        if k < 0:
            continue
        s, e = spans[k]
        mask[t] = int(s < ts <= e if ts == te else ts < e)
    return mask


def tokenize_messages(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    tools: list[dict] | None = None,
    *,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Tokenize a conversation: `{"input_ids", "assistant_mask", "truncated"}`.

    `assistant_mask[t] = 1` where token t belongs to an assistant message's content or its end-of-turn
    marker, in every turn.
    """
    _require_offsets(tokenizer)
    text = render_chat(tokenizer, messages, tools=tools)
    spans = assistant_char_spans(tokenizer, messages, text, tools)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = _mask_from_spans([tuple(o) for o in enc["offset_mapping"]], spans)
    out = _truncate({"input_ids": list(enc["input_ids"])}, max_length)
    out["assistant_mask"] = mask[: len(out["input_ids"])]
    return out


def tokenize_prompt_completion(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | list[dict[str, Any]],
    completion: str | list[dict[str, Any]],
    *,
    tools: list[dict] | None = None,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Tokenize a prompt and its completion separately: `{"prompt_ids", "completion_ids", "truncated"}`.

    Plain strings: the prompt is tokenized as is (with the tokenizer's special tokens, e.g. BOS) and the
    completion gets EOS appended unless its tokens already end with it (never two EOS). Conversations: the
    prompt is rendered with the generation prompt and the completion is the rest of the full rendering up to
    its last end-of-turn marker (trailing whitespace dropped), each tokenized without special tokens. With
    `max_length`, the concatenation keeps its first `max_length` tokens (the completion is cut first).
    """
    if isinstance(prompt, str) != isinstance(completion, str):
        raise ValueError("prompt and completion must both be strings or both be lists of messages")
    if isinstance(prompt, str):
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
        eos = _eos_id(tokenizer)
        if not completion_ids or completion_ids[-1] != eos:  # a completion may already end with its EOS
            completion_ids.append(eos)
    else:
        prompt_text = render_chat(tokenizer, prompt, add_generation_prompt=True, tools=tools)
        full_text = render_chat(tokenizer, list(prompt) + list(completion), tools=tools)
        if not full_text.startswith(prompt_text):
            raise ValueError(
                "the chat template does not render prefix-consistently: the prompt rendered with "
                "add_generation_prompt=True is not a prefix of prompt + completion"
            )
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        completion_text = full_text[len(prompt_text):].rstrip()
        completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    return _truncate({"prompt_ids": list(prompt_ids), "completion_ids": list(completion_ids)}, max_length)


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str, *, max_length: int | None = None) -> dict[str, Any]:
    """Tokenize a plain language-modeling row, with EOS appended: `{"input_ids", "truncated"}`."""
    ids = list(tokenizer(text)["input_ids"])
    eos = _eos_id(tokenizer)
    if not ids or ids[-1] != eos:
        ids.append(eos)
    return _truncate({"input_ids": ids}, max_length)
