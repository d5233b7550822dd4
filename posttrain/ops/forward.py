"""Per-token log-probs (and entropies, argmax, divergences) of a causal LM without its full logits.

:func:`token_logps` calls the model through its own top-level ``forward`` (so DDP, DeepSpeed and PEFT
wrappers, gradient checkpointing and user hooks all behave as usual) with ``logits_to_keep=1``, so the
head only runs on the last position, and captures the decoder's last hidden state (after the final
norm) with a forward hook on ``get_decoder()``. The per-token quantities are then computed from those
hidden states and the output head by the chunked ops in :mod:`posttrain.ops.logprobs`.

Alignment (docs/internals.md): every returned ``[B, L]`` tensor is aligned with ``input_ids``;
``logps[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`` comes from ``hidden[b, t - 1]``, and
positions without a prediction (``t = 0``, the first token of a packed sequence, left padding) are 0.

Known limit: under DeepSpeed ZeRO-3 or FSDP with sharded parameters the head's weight is only whole
inside the module's own forward; those setups must gather it (or use the plain logits path).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from posttrain.ops.divergences import chunked_divergence
from posttrain.ops.logprobs import auto_chunk_size, selective_log_softmax_ext
from posttrain.ops.wrappers import unwrap_model

__all__ = ["TokenLogps", "token_logps", "token_divergence", "output_head", "shared_head", "decoder_module",
           "decoder_hidden_states", "prediction_mask"]


@dataclass
class TokenLogps:
    """Per-token outputs aligned with ``input_ids`` (0 where no prediction was computed)."""

    logps: Tensor  # [B, L] float32
    entropy: Tensor | None = None  # [B, L] float32
    hidden: Tensor | None = None  # [B, L, H] decoder output, when return_hidden=True
    argmax: Tensor | None = None  # [B, L] long: argmax token predicted for position t (from t-1); -1 if none
    mask: Tensor | None = None  # [B, L] bool: where values were computed


def _active_module(head: nn.Module) -> nn.Module:
    """Resolve a PEFT ``modules_to_save`` wrapper to the module that its forward would run."""
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):
        active = head.active_adapters if hasattr(head, "active_adapters") else [head.active_adapter]
        active = active[0] if isinstance(active, (list, tuple)) and active else active
        if getattr(head, "disable_adapters", False) or active not in head.modules_to_save:
            return head.original_module
        return head.modules_to_save[active]
    return head


def output_head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The output embedding's ``(weight [V, H], bias [V] | None)``; tied weights are the same Parameter."""
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"{type(base).__name__} transforms its logits ({attr}="
                                      f"{getattr(config, attr)}); the chunked log-prob path does not support it")
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (get_output_embeddings() is None)")
    head = _active_module(head)
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise NotImplementedError("an adapter on the output head (e.g. LoRA on lm_head) is not supported by the "
                                  "chunked path; put the head in modules_to_save instead")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"output head {type(head).__name__} has no [V, H] weight")
    return weight, getattr(head, "bias", None)


def shared_head(model: nn.Module, vocab_size: int | None = None) -> tuple[Tensor, Tensor | None]:
    """`output_head` restricted to its first ``vocab_size`` rows (views, so gradients reach the full weight).

    Models that share a tokenizer may pad their embeddings to different sizes; comparing two of them (a
    student and its teacher) takes both distributions over the ids they share, ``min(V_S, V_T)``."""
    weight, bias = output_head(model)
    if vocab_size is None or vocab_size == weight.shape[0]:
        return weight, bias
    if not 0 < vocab_size <= weight.shape[0]:
        raise ValueError(f"vocab_size={vocab_size}: the head has {weight.shape[0]} rows")
    return weight[:vocab_size], (bias[:vocab_size] if bias is not None else None)


def decoder_module(model: nn.Module) -> nn.Module:
    """The decoder stack under the LM head (``get_decoder()`` or ``.model``), wrappers stripped."""
    base = unwrap_model(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    if decoder is None or decoder is base:
        decoder = getattr(base, "model", None)
    if not isinstance(decoder, nn.Module):
        raise ValueError(f"cannot find the decoder of {type(base).__name__} (no get_decoder() or .model)")
    return decoder


@contextlib.contextmanager
def _capture_hidden(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Context manager whose dict gets ``"hidden"``: the decoder's last (post-norm) hidden state."""
    store: dict[str, Tensor] = {}

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        store["hidden"] = hidden if hidden is not None else output[0]

    handle = decoder_module(model).register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def decoder_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                          position_ids: Tensor | None = None, **model_kwargs: Any) -> Tensor:
    """Run ``model(...)`` (top-level forward, head on the last position only) and return ``[B, L, H]``.

    Calls with ``use_cache=False``: besides saving memory, transformers only applies the per-sequence
    (padding-free) attention mask derived from ``position_ids`` when there is no KV cache.
    """
    kwargs = dict(model_kwargs)
    if attention_mask is not None and attention_mask.dim() == 2 and position_ids is not None \
            and bool(attention_mask.all()):
        # An all-ones mask adds nothing, but transformers only detects packed (padding-free) sequences
        # from position_ids when attention_mask is None (and there is no KV cache).
        attention_mask = None
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if _accepts(model, "logits_to_keep"):
        kwargs.setdefault("logits_to_keep", 1)
    kwargs.setdefault("use_cache", False)
    with _capture_hidden(model) as store:
        model(input_ids=input_ids, **kwargs)
    if "hidden" not in store:
        raise RuntimeError("the decoder's forward hook did not fire; cannot capture hidden states")
    return store["hidden"]


def prediction_mask(input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                    mask: Tensor | None = None) -> Tensor:
    """``[B, L]`` bool: positions ``t`` whose token can be predicted from position ``t - 1``.

    Starts from ``mask`` (default: everywhere) and removes ``t = 0``, every sequence start
    (``position_ids == 0``, padding-free rows) and positions where ``t`` or ``t - 1`` is padding
    (a 2D ``attention_mask``; a 4D one is passed to the model but not read here).
    """
    out = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.to(torch.bool).clone()
    if out.shape != input_ids.shape:
        raise ValueError(f"mask shape {tuple(out.shape)} differs from input_ids {tuple(input_ids.shape)}")
    out[:, 0] = False
    if attention_mask is not None and attention_mask.dim() == 2:  # a 4D (block) mask says nothing about padding
        am = attention_mask.to(torch.bool)
        out[:, 1:] &= am[:, 1:] & am[:, :-1]
    if position_ids is not None:
        out &= position_ids.expand_as(input_ids) != 0
    return out


def _rows(hidden: Tensor, mask: Tensor) -> Tensor:
    """Hidden states ``[N, H]`` that predict the masked positions (``hidden[b, t - 1]``)."""
    return hidden[:, :-1][mask[:, 1:]]


def _scatter(values: Tensor, mask: Tensor, fill: float | int = 0) -> Tensor:
    out = torch.full(mask.shape, fill, dtype=values.dtype, device=values.device)
    return out.masked_scatter(mask, values)


def token_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, *, mask: Tensor | None = None, temperature: float = 1.0,
                with_entropy: bool = False, with_argmax: bool = False, chunk_size: int | None = None,
                return_hidden: bool = False, vocab_size: int | None = None, **model_kwargs: Any) -> TokenLogps:
    """Per-token log-probs of ``input_ids`` under ``model``, computed only where ``mask`` is set.

    Args:
        model: a causal LM, possibly wrapped (DDP, DeepSpeed, PEFT, ``torch.compile``).
        input_ids / attention_mask / position_ids: ``[B, L]``; padding-free rows are ``[1, T]`` with
            ``position_ids`` restarting at 0 per sequence.
        mask: ``[B, L]`` positions to compute (e.g. the completion mask); default all that have a prediction.
        temperature: logits are divided by it (as the sampler did).
        with_entropy / with_argmax: also return per-token entropy / argmax token (for token accuracy).
        chunk_size: rows per block in the chunked head computation.
        return_hidden: also return the decoder's last hidden state ``[B, L, H]``.
        vocab_size: normalize over the first ``vocab_size`` ids of the head only (the vocabulary shared
            with another model whose embedding is padded differently; see `shared_head`).
        model_kwargs: passed to the model's forward.

    Returns:
        :class:`TokenLogps` whose tensors are aligned with ``input_ids`` (0, or -1 for argmax, elsewhere).
    """
    hidden = decoder_hidden_states(model, input_ids, attention_mask, position_ids, **model_kwargs)
    pmask = prediction_mask(input_ids, attention_mask, position_ids, mask)
    weight, bias = shared_head(model, vocab_size)
    rows = _rows(hidden, pmask)
    labels = input_ids[pmask]
    logps, entropy, argmax = selective_log_softmax_ext(
        rows, weight, labels, bias=bias, temperature=temperature, chunk_size=chunk_size,
        with_entropy=with_entropy, with_argmax=with_argmax)
    return TokenLogps(
        logps=_scatter(logps, pmask),
        entropy=_scatter(entropy, pmask) if entropy is not None else None,
        hidden=hidden if return_hidden else None,
        argmax=_scatter(argmax, pmask, -1) if argmax is not None else None,
        mask=pmask,
    )


def token_divergence(student: nn.Module, teacher: nn.Module, input_ids: Tensor,
                     attention_mask: Tensor | None = None, position_ids: Tensor | None = None, *,
                     mask: Tensor | None = None, kind: str = "jsd", beta: float = 0.5, temperature: float = 1.0,
                     chunk_size: int | None = None, vocab_size: int | None = None,
                     student_logps_temperature: float | None = None,
                     **model_kwargs: Any) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token ``[B, L]`` divergence between student and teacher next-token distributions.

    Value at ``t`` compares the distributions both models predict for token ``t`` (from ``t - 1``);
    see :func:`posttrain.ops.divergences.chunked_divergence` for ``kind`` and ``beta``. The teacher runs
    under ``torch.no_grad``; gradients reach the student only. ``vocab_size``: both distributions over the
    first ``vocab_size`` ids (default: the smaller head's size; see `shared_head`).

    With ``student_logps_temperature``, returns ``(divergence, logps)``: also the student's log-probs of the
    tokens of ``input_ids`` (its whole head, logits divided by that temperature), from the same forward, so a
    loss that needs both (MiniLLM's policy gradient plus its per-token reverse KL) runs the student once.
    """
    hs = decoder_hidden_states(student, input_ids, attention_mask, position_ids, **model_kwargs)
    with torch.no_grad():
        ht = decoder_hidden_states(teacher, input_ids, attention_mask, position_ids, **model_kwargs)
    if vocab_size is None:
        vocab_size = min(output_head(student)[0].shape[0], output_head(teacher)[0].shape[0])
    wt, bt = shared_head(teacher, vocab_size)
    pmask = prediction_mask(input_ids, attention_mask, position_ids, mask)
    ws, bs = shared_head(student, vocab_size)
    values = chunked_divergence(_rows(hs, pmask), ws, _rows(ht, pmask), wt.detach(), kind=kind, beta=beta,
                                student_bias=bs, teacher_bias=bt.detach() if bt is not None else None,
                                temperature=temperature, chunk_size=auto_chunk_size(vocab_size, chunk_size))
    if student_logps_temperature is None:
        return _scatter(values, pmask)
    full_ws, full_bs = output_head(student)
    logps, _, _ = selective_log_softmax_ext(_rows(hs, pmask), full_ws, input_ids[pmask], bias=full_bs,
                                            temperature=student_logps_temperature, chunk_size=chunk_size)
    return _scatter(values, pmask), _scatter(logps, pmask)
