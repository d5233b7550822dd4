"""Per-token log-probs of sampled completions under a policy, laid out per completion.

Online trainers score ``prompt_ids + completion_ids`` sequences and need each completion's token
log-probs as ``[B, Lc]`` (row ``b`` holds completion ``b``'s tokens left-aligned, zero-padded, with a
``[B, Lc]`` mask), the same layout as the sampler's log-probs and the completion ids. The forward goes
through `posttrain.ops.token_logps` (no ``[B, L, vocab]`` logits), padding-free by default: all
sequences in one row ``[1, T]`` with per-sequence ``position_ids``, so no compute is spent on padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.padding_free import padding_free_row
from ..ops import token_divergence, token_logps, unwrap_model


@dataclass
class CompletionLogps:
    """``logps``/``entropy``: ``[B, Lc]`` float32; ``mask``: ``[B, Lc]`` bool (the completion's tokens)."""

    logps: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor | None = None


def completion_mask(lengths: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """``[B, max(lengths)]`` bool mask with the first ``lengths[b]`` entries of row ``b`` set."""
    width = max(max(lengths, default=0), 1)
    return torch.arange(width, device=device).unsqueeze(0) < torch.tensor(list(lengths), device=device).unsqueeze(1)


def pad_values(values: Sequence[Sequence[float]], device: torch.device | str | None = None) -> torch.Tensor:
    """Per-completion lists (e.g. the sampler's log-probs) -> ``[B, Lc]`` float32, zero-padded on the right."""
    mask = completion_mask([len(v) for v in values], device)
    out = torch.zeros(mask.shape, dtype=torch.float32, device=device)
    flat = [x for v in values for x in v]
    if flat:
        out[mask] = torch.tensor(flat, dtype=torch.float32, device=device)
    return out


def _device(model: torch.nn.Module) -> torch.device:
    return next(unwrap_model(model).parameters()).device


def _completion_inputs(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                       device: torch.device, padding_free: bool, pad_token_id: int):
    """``(input_ids, attention_mask, position_ids, completion token mask)`` of prompt + completion sequences:
    one padding-free row ``[1, T]``, or right-padded rows ``[B, L]``."""
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token to predict its completion's first token from")
    if padding_free:
        row = padding_free_row(prompt_ids, completion_ids, device=device)
        return row.input_ids, None, row.position_ids, row.completion_mask
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    tok_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for b, (p, s) in enumerate(zip(prompt_ids, seqs)):
        input_ids[b, : len(s)] = torch.tensor(s, device=device)
        attention_mask[b, : len(s)] = 1
        tok_mask[b, len(p) : len(s)] = True
    return input_ids, attention_mask, None, tok_mask


def completion_logps(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    padding_free: bool = True,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 1024,
    pad_token_id: int = 0,
    vocab_size: int | None = None,
) -> CompletionLogps:
    """Log-probs (and entropies) of each completion's tokens given its prompt, as ``[B, Lc]``.

    Logits are divided by ``temperature`` first, as the sampler did, so these are comparable with the
    sampler's log-probs. Every prompt must be non-empty (a completion's first token is predicted from
    the prompt's last one). Gradients flow unless called under ``torch.no_grad``. ``vocab_size``: normalize
    over the first ``vocab_size`` ids only (the vocabulary shared with a teacher; `posttrain.ops.shared_head`).
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts for {len(completion_ids)} completions")
    device = _device(model)
    lengths = [len(c) for c in completion_ids]
    input_ids, attention_mask, position_ids, tok_mask = _completion_inputs(prompt_ids, completion_ids, device,
                                                                            padding_free, pad_token_id)
    out = token_logps(model, input_ids, attention_mask, position_ids, mask=tok_mask, temperature=temperature,
                      with_entropy=with_entropy, chunk_size=chunk_size, vocab_size=vocab_size)
    mask = completion_mask(lengths, device)
    logps = out.logps.new_zeros(mask.shape).masked_scatter(mask, out.logps[tok_mask])
    entropy = None
    if out.entropy is not None:
        entropy = out.entropy.new_zeros(mask.shape).masked_scatter(mask, out.entropy[tok_mask])
    return CompletionLogps(logps=logps, mask=mask, entropy=entropy)


def _widen(values: torch.Tensor | None, width: int) -> torch.Tensor | None:
    return None if values is None else F.pad(values, (0, width - values.shape[1]))


def partial_grad_completion_logps(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    needs_grad: torch.Tensor,
    no_grad_model: torch.nn.Module | None = None,
    **kwargs,
) -> CompletionLogps:
    """`completion_logps` where only the completions with ``needs_grad[b]`` set are run with gradients.

    The others run in a second forward under ``torch.no_grad``: same values, but no activations kept and no
    backward through them. For a loss whose gradient vanishes on some rows (an online method's completions
    with advantage 0 and no KL in the loss) this gives the loss, its metrics and its gradient unchanged at a
    fraction of the cost. At least one row keeps its gradient, so the loss always reaches every parameter
    (DDP expects a gradient from each process). ``no_grad_model`` runs the rows without gradients (default:
    ``model``); under DDP pass the bare module, whose forward runs no collective, so that a process whose
    batch splits this way stays in lockstep with one whose batch does not. Returns the usual ``[B, Lc]``
    layout, in the input order.
    """
    flags = needs_grad.detach().to("cpu", torch.bool).flatten()
    if flags.numel() != len(completion_ids):
        raise ValueError(f"needs_grad has {flags.numel()} entries for {len(completion_ids)} completions")
    if not bool(flags.any()):
        flags = flags.clone()
        flags[0] = True
    if bool(flags.all()) or not torch.is_grad_enabled():
        return completion_logps(model, prompt_ids, completion_ids, **kwargs)
    grad_rows, rest_rows = flags.nonzero().flatten().tolist(), (~flags).nonzero().flatten().tolist()

    def run(module: torch.nn.Module, rows: list[int]) -> CompletionLogps:
        return completion_logps(module, [prompt_ids[i] for i in rows], [completion_ids[i] for i in rows], **kwargs)

    with_grad = run(model, grad_rows)
    with torch.no_grad():
        without = run(no_grad_model if no_grad_model is not None else model, rest_rows)
    mask = completion_mask([len(c) for c in completion_ids], with_grad.logps.device)
    width = mask.shape[1]
    order = torch.tensor(grad_rows + rest_rows, device=mask.device).argsort()

    def merge(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        return None if a is None else torch.cat([_widen(a, width), _widen(b, width)]).index_select(0, order)

    return CompletionLogps(logps=merge(with_grad.logps, without.logps), mask=mask,
                           entropy=merge(with_grad.entropy, without.entropy))


@torch.no_grad()
def batched_completion_logps(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    batch_size: int,
    **kwargs,
) -> torch.Tensor:
    """`completion_logps` without gradients, ``batch_size`` completions per forward, as one ``[N, Lc]``."""
    width = max([len(c) for c in completion_ids] + [1])
    out = torch.zeros(len(completion_ids), width, device=_device(model))
    for start in range(0, len(completion_ids), batch_size):
        part = completion_logps(model, prompt_ids[start : start + batch_size],
                                completion_ids[start : start + batch_size], **kwargs)
        out[start : start + part.logps.shape[0], : part.logps.shape[1]] = part.logps
    return out


def completion_divergence(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    kind: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    padding_free: bool = True,
    chunk_size: int | None = None,
    pad_token_id: int = 0,
    vocab_size: int | None = None,
    student_logps_temperature: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token divergence between student and teacher at each completion token, ``([B, Lc], mask [B, Lc])``;
    with ``student_logps_temperature``, ``(divergence, student logps, mask)`` from one student forward.

    Both models read the same prompt + completion sequences; the divergence at token ``t`` compares their
    full next-token distributions (`posttrain.ops.token_divergence`: from hidden states and each head in
    chunks, never ``[B, L, V]``). Gradients reach the student only.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts for {len(completion_ids)} completions")
    device = _device(student)
    input_ids, attention_mask, position_ids, tok_mask = _completion_inputs(prompt_ids, completion_ids, device,
                                                                            padding_free, pad_token_id)
    out = token_divergence(student, teacher, input_ids, attention_mask, position_ids, mask=tok_mask, kind=kind,
                           beta=beta, temperature=temperature, chunk_size=chunk_size, vocab_size=vocab_size,
                           student_logps_temperature=student_logps_temperature)
    mask = completion_mask([len(c) for c in completion_ids], device)
    parts = out if isinstance(out, tuple) else (out,)
    laid_out = [v.new_zeros(mask.shape).masked_scatter(mask, v[tok_mask]) for v in parts]
    return (*laid_out, mask)
