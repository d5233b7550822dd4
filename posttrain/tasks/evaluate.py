"""Exact-match evaluation of a model on a task's held-out prompts by greedy decoding.

Used by the quickstart, examples and tests to show that a trainer made the model better at the task.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..models.peft_utils import unwrap_model
from .arithmetic import accuracy_reward

__all__ = ["exact_match", "greedy_completions"]


def _render(tokenizer: PreTrainedTokenizerBase, prompt: Any, conversational: bool) -> str:
    if conversational:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise TypeError(f"conversational=False needs string prompts, got {type(prompt).__name__}")
    return prompt


def _stop_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None and im_end not in ids:
        ids.append(im_end)
    return ids


@torch.inference_mode()
def greedy_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Any],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    conversational: bool | None = None,
) -> list[str]:
    """Greedy-decode each prompt (batched, left-padded, KV cache) and return the completion texts.

    `conversational=None` decides from the first prompt (a list of messages -> chat template with the
    generation prompt). The model's train/eval mode and the tokenizer's padding side are restored.
    """
    if conversational is None:
        conversational = bool(prompts) and isinstance(prompts[0], list)
    texts = [_render(tokenizer, p, conversational) for p in prompts]
    net = unwrap_model(model, strip_peft=False)
    device = next(net.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = _stop_ids(net, tokenizer)
    was_training, side = net.training, tokenizer.padding_side
    # sort by length so each batch pads little; restore the order at the end
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[str] = [""] * len(texts)
    try:
        net.eval()
        tokenizer.padding_side = "left"
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            gen = net.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                pad_token_id=pad_id, eos_token_id=stop, temperature=None, top_p=None, top_k=None,
            )
            new = gen[:, enc["input_ids"].shape[1]:]
            for i, row in zip(idx, new.tolist()):
                out[i] = tokenizer.decode(row, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        net.train(was_training)
    return out


def exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Any,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    conversational: bool | None = None,
    return_samples: bool = False,
) -> float | tuple[float, list[tuple[Any, str, bool]]]:
    """Fraction of `dataset` rows (`prompt`, `answer` columns) whose greedy completion's `<answer>`
    equals `answer`. With `return_samples=True` also returns `(prompt, completion, correct)` per row."""
    prompts, answers = list(dataset["prompt"]), [str(a) for a in dataset["answer"]]
    if not prompts:
        raise ValueError("exact_match needs a non-empty dataset with 'prompt' and 'answer' columns")
    completions = greedy_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, conversational=conversational)
    scores = accuracy_reward(prompts, completions, answers)
    accuracy = sum(scores) / len(scores)
    if return_samples:
        return accuracy, [(p, c, s == 1.0) for p, c, s in zip(prompts, completions, scores)]
    return accuracy
