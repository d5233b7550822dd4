"""Chunked selective log-softmax: per-token log-probs (and entropies) without the [N, V] logits.

A causal LM's head maps hidden states ``h [N, H]`` to logits ``z = h W^T + b`` over a vocabulary of
``V`` tokens. Training only needs, per row, ``log p(y) = z_y - logsumexp(z)`` (and sometimes the
entropy), yet the usual path materializes ``z`` for every row, plus its softmax and its gradient:
three ``[N, V]`` float32 tensors, which at ``V = 150k`` dominate memory.

:func:`selective_log_softmax` walks over the rows in chunks of ``chunk_size``: forward keeps one
``[chunk, V]`` block at a time and saves only the inputs and one float per row (the logsumexp); backward recomputes
each chunk's logits and accumulates the gradients of ``h``, ``W`` and ``b``. Peak extra memory is
``O(chunk_size * V)`` instead of ``O(N * V)``, at the cost of one extra matmul in backward (the same trade
as activation checkpointing). When the whole ``[N, V]`` block is small (``KEEP_LOGITS_BYTES``, 256 MiB),
forward keeps the softmax probabilities and backward turns them into the gradient in place: one ``[N, V]``
buffer, no recompute and no second ``exp`` (the entropy's gradient uses ``p log p``). They are kept
unnormalized, with ``1 / sum`` per row, which the backward folds into the pass it makes anyway, and on CPU
the buffer is reused from one call to the next (a one-slot pool). Larger inputs (long sequences, 150k
vocabularies) recompute. The chunks' logits come from a head packed once per call for oneDNN on CPU
(`posttrain.ops.packed_linear`; the measurements behind these choices are in benchmarks/README.md).

All softmax, log-sum-exp and gradient arithmetic is in float32 (float64 for float64 inputs) whatever the input
dtype. The head's matrix products are float32 too, except under mixed precision
(`posttrain.ops.fast_paths.head_precision`, entered by the trainers with ``bf16=True``): they then take bf16
inputs with float32 accumulation and the logits are widened to float32 before any softmax, so the log-probs
carry only the logits' bf16 rounding (tests/test_fast_paths.py holds them within 0.1 nats of float32). Outputs
are float32 (float64 for float64 inputs); gradients come back in each input's dtype.
Only torch is imported here (see docs/internals.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fast_paths import fast_paths_enabled, head_matmul_dtype
from .packed_linear import PackedLinear, low_precision_mm

__all__ = ["selective_log_softmax", "selective_log_softmax_ext", "argmax_tokens", "naive_log_softmax",
           "release_kept_buffers", "log_sum_sq_probs"]


CHUNK_ELEMENTS = 1 << 22  # ~16 MiB of float32 logits per chunk
# Probabilities of at most this size are kept from forward for backward instead of recomputed: one [N, V]
# matmul and one exp pass less (32k vocabulary, 2048 rows = 256 MiB).
KEEP_LOGITS_BYTES = 256 << 20


def auto_chunk_size(vocab_size: int, chunk_size: int | None = None) -> int:
    """Rows per chunk: `chunk_size` when given, else as many rows as keep one `[rows, V]` float32 block near
    16 MiB (128 rows for a 32k vocabulary, 2048 for 2k; at least 64, since fewer rows make the head's matmuls
    inefficient), so peak memory does not grow with the vocabulary (timings per chunk size: benchmarks/README.md)."""
    if chunk_size:
        return int(chunk_size)
    return max(64, min(8192, CHUNK_ELEMENTS // max(1, vocab_size)))


def _check(hidden: Tensor, weight: Tensor, labels: Tensor | None, bias: Tensor | None, chunk_size: int,
           temperature: float) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden has H={hidden.shape[1]}, weight has H={weight.shape[1]}")
    if labels is not None and labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N]={hidden.shape[0]}, got {tuple(labels.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V]={weight.shape[0]}, got {tuple(bias.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if labels is not None and labels.device.type == "cpu" and labels.numel() > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"labels must lie in [0, V={weight.shape[0]}), got values in [{lo}, {hi}]; "
                             "drop ignored positions (e.g. -100) before calling")


# One spare CPU buffer for kept probabilities, handed back by the backward that used it: a fresh [N, V] buffer
# is a fresh mmap whose pages fault on first write, several times slower than reused ones. Bounded by
# KEEP_LOGITS_BYTES.
# GPU memory needs no pool: the caching allocator keeps freed blocks.
_spare_probs: list[Tensor] = []


def _take_probs_buffer(like: Tensor, rows: int, vocab: int, dtype: torch.dtype) -> Tensor:
    """A ``[rows, vocab]`` buffer: the spare one when it is big enough (taken out of the pool), else new."""
    if like.device.type == "cpu" and _spare_probs and fast_paths_enabled():
        spare = _spare_probs.pop()
        if spare.dtype == dtype and spare.numel() >= rows * vocab:
            return spare[: rows * vocab].view(rows, vocab)
    return torch.empty((rows, vocab), dtype=dtype, device=like.device)


def _return_probs_buffer(probs: Tensor) -> None:
    """Keep ``probs``'s storage as the spare buffer (CPU only, when there is none)."""
    if probs.device.type != "cpu" or _spare_probs or not fast_paths_enabled():
        return
    flat = torch.empty(0, dtype=probs.dtype).set_(probs.untyped_storage())
    _spare_probs.append(flat)


def release_kept_buffers() -> None:
    """Free the spare probability buffer (the trainers call this when training ends)."""
    _spare_probs.clear()


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float32, or float64 when an input is float64 (so float64 tests stay exact)."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors) else torch.float32


def _chunk_logits(h: Tensor, head: PackedLinear, temperature: float, out: Tensor | None = None) -> Tensor:
    """Logits of one chunk of rows in the compute dtype, divided by the temperature (into ``out`` when the head
    is not packed)."""
    z = head(h, out=out)
    if temperature != 1.0:
        z /= temperature
    return z


def _chunk_stats(z: Tensor, labels: Tensor, with_entropy: bool, with_argmax: bool,
                 probs_out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor]:
    """``(lse, logp(label), entropy | None, argmax | None, 1 / S)`` per row of one chunk's logits ``z [c, V]``.

    ``z`` is overwritten (shifted by its row max, then exponentiated, or multiplied by ``e`` for the entropy). With
    ``probs_out``, the rows' unnormalized probabilities ``e`` are written there (what a kept-logits backward
    needs, with ``1 / S``: the softmax is ``e / S``; the backward folds the division into its own pass).
    ``H = log(S) - sum_j e_j z'_j / S`` with ``z' = z - max``, ``e = exp(z')``, ``S = sum_j e_j``.
    """
    argmax = z.argmax(-1) if with_argmax else None
    peak = z.amax(-1, keepdim=True)
    z.sub_(peak)
    logp = z.gather(1, labels[:, None]).squeeze(1)
    if probs_out is not None:
        e = torch.exp(z, out=probs_out)
    else:
        e = z.exp() if with_entropy else z.exp_()
    total = e.sum(-1, keepdim=True)
    log_total = total.log()
    # z is not needed again: multiply in place rather than allocate another [c, V] block
    entropy = log_total.squeeze(1) - z.mul_(e).sum(-1) / total.squeeze(1) if with_entropy else None
    return (peak + log_total).squeeze(1), logp - log_total.squeeze(1), entropy, argmax, total.reciprocal_().squeeze(1)


class _SelectiveLogSoftmax(torch.autograd.Function):
    """Chunked log p(label), entropy and argmax; backward from kept probabilities or recomputed logits."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                chunk_size: int, with_entropy: bool, with_argmax: bool, keep_logits: bool):
        n, cdt = hidden.shape[0], _compute_dtype(hidden, weight, bias)
        mdt = head_matmul_dtype() if cdt == torch.float32 else None
        weight_c = weight.to(cdt)
        head = PackedLinear(weight_c, min(chunk_size, n), bias.to(cdt) if bias is not None else None,
                            matmul_dtype=mdt)
        logps = hidden.new_empty(n, dtype=cdt)
        lse = hidden.new_empty(n, dtype=cdt)
        entropy = hidden.new_empty(n if with_entropy else 0, dtype=cdt)
        argmax = labels.new_empty(n if with_argmax else 0, dtype=torch.long)
        probs = _take_probs_buffer(hidden, n, weight.shape[0], cdt) if keep_logits else None
        inv_total = hidden.new_empty(n if keep_logits else 0, dtype=cdt)
        # one chunk's logits, reused (a packed head returns its own)
        plain = head.packed is None and head.low is None
        block = hidden.new_empty((min(chunk_size, n), weight.shape[0]), dtype=cdt) if plain else None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = _chunk_logits(hidden[s:e], head, temperature, out=block[: e - s] if block is not None else None)
            lse[s:e], logps[s:e], entropy_c, argmax_c, inv_total_c = _chunk_stats(
                z, labels[s:e], with_entropy, with_argmax, probs[s:e] if probs is not None else None)
            if probs is not None:
                inv_total[s:e] = inv_total_c
            if with_entropy:
                entropy[s:e] = entropy_c
            if with_argmax:
                argmax[s:e] = argmax_c
        del block
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy, inv_total)
        ctx.temperature, ctx.chunk_size, ctx.matmul_dtype = temperature, chunk_size, mdt
        ctx.kept_probs = probs  # consumed (overwritten) by the first backward; a second one recomputes
        # An output the loss does not use (the entropy, logged as a metric) gets None, not a zero gradient
        # that would cost the backward pass three more [chunk, V] passes.
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(argmax)
        return logps, entropy, argmax

    @staticmethod
    def backward(ctx, g_logp: Tensor | None, g_ent: Tensor | None, _g_argmax):
        hidden, weight, bias, labels, lse, entropy, inv_total = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        t, n, cdt, mdt = ctx.temperature, hidden.shape[0], lse.dtype, ctx.matmul_dtype
        weight_c = weight.to(cdt)
        bias_c = bias.to(cdt) if bias is not None else None
        if g_ent is not None and g_ent.numel() == 0:
            g_ent = None
        kept, ctx.kept_probs = ctx.kept_probs, None
        if g_logp is None and g_ent is None:
            return (None,) * 9
        # Recomputing: each chunk's gradient is multiplied out as it is made. Kept: the chunks only turn the
        # probabilities into the gradient in place, then one whole-batch matmul per input follows.
        per_chunk = kept is None
        head = PackedLinear(weight_c, min(ctx.chunk_size, n), bias_c, matmul_dtype=mdt) if per_chunk else None
        # the products' low-precision copy of the weight, cast once (the recomputing head's own, when it has one)
        weight_m = weight_c if mdt is None else head.low if head is not None else weight_c.to(mdt)
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h and per_chunk else None
        grad_w = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_w and per_chunk else None
        grad_b = torch.zeros(weight.shape[0], dtype=cdt, device=weight.device) if need_b and per_chunk else None
        for s in range(0, n, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            h = hidden[s:e]
            # dH/dz_j = -p_j (z_j - sum_k p_k z_k) = -p_j (log p_j + H); ent_term = -g_ent * dH/dz
            ent_term = None
            if not per_chunk:
                p = kept[s:e]  # unnormalized: p * inv_total is the softmax
                if g_ent is not None:
                    p.mul_(inv_total[s:e, None])
                    ent_term = torch.special.xlogy(p, p).add_(p * entropy[s:e, None]).mul_(g_ent[s:e, None].to(cdt))
            else:
                z = _chunk_logits(h, head, t)
                if g_ent is not None:  # reuse z's buffer
                    p = (z - lse[s:e, None]).exp_()
                    mean_z = (p * z).sum(-1, keepdim=True)
                    ent_term = z.sub_(mean_z).mul_(p).mul_(g_ent[s:e, None].to(cdt))
                else:
                    p = z.sub_(lse[s:e, None]).exp_()
                del z
            # d logp_y / dz_j = 1[j = y] - p_j; reuse p's buffer for the gradient
            if g_logp is not None:
                gl = g_logp[s:e, None].to(cdt)
                gz = p.mul_(-gl if per_chunk or g_ent is not None else -gl * inv_total[s:e, None])
                gz.scatter_add_(1, labels[s:e, None], gl)
                if ent_term is not None:
                    gz.sub_(ent_term)
            else:
                gz = ent_term.neg_() if per_chunk else p.copy_(ent_term).neg_()  # kept: the gradient goes in p
            if t != 1.0:  # z = raw / t
                gz /= t
            if per_chunk:
                if need_h:
                    grad_h[s:e] = low_precision_mm(gz, weight_m, mdt).to(hidden.dtype)
                if need_w:
                    if mdt is None:
                        grad_w.addmm_(gz.T, h.to(cdt))
                    else:
                        grad_w += low_precision_mm(gz.T, h.to(cdt), mdt)
                if need_b:
                    grad_b += gz.sum(0)
        if not per_chunk:
            # The whole [N, V] gradient is in `kept`: one [N, V] x [V, H] and one [V, N] x [N, H] matmul, faster
            # than the same products in chunks.
            if need_h:
                grad_h = low_precision_mm(kept, weight_m, mdt).to(hidden.dtype)
            if need_w:
                grad_w = low_precision_mm(kept.T, hidden.to(cdt), mdt)
            if need_b:
                grad_b = kept.sum(0)
            _return_probs_buffer(kept)
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def selective_log_softmax_ext(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                              temperature: float = 1.0, chunk_size: int | None = None, with_entropy: bool = False,
                              with_argmax: bool = False, keep_logits: bool | None = None
                              ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """:func:`selective_log_softmax` that can also return the argmax token of each row (no gradient).

    Returns ``(logps [N], entropy [N] | None, argmax [N] | None)``; the argmax comes from the same
    chunked pass, so token accuracy costs no extra matmul. ``keep_logits``: keep the ``[N, V]`` softmax
    probabilities for backward rather than recompute the logits (default: when they fit in
    ``KEEP_LOGITS_BYTES`` and a gradient is needed).
    """
    chunk_size = auto_chunk_size(weight.shape[0], chunk_size)
    _check(hidden, weight, labels, bias, chunk_size, temperature)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    if keep_logits is None:
        itemsize = torch.finfo(_compute_dtype(hidden, weight, bias)).bits // 8
        keep_logits = hidden.shape[0] * weight.shape[0] * itemsize <= KEEP_LOGITS_BYTES
    logps, entropy, argmax = _SelectiveLogSoftmax.apply(
        hidden, weight, bias, labels, float(temperature), int(chunk_size), bool(with_entropy), bool(with_argmax),
        bool(keep_logits and needs_grad))
    return logps, (entropy if with_entropy else None), (argmax if with_argmax else None)


def selective_log_softmax(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                          temperature: float = 1.0, chunk_size: int | None = None,
                          with_entropy: bool = False, keep_logits: bool | None = None) -> tuple[Tensor, Tensor | None]:
    """Per-row ``log softmax(h W^T + b) / T)[label]`` and optionally the entropy, chunked over rows.

    Args:
        hidden: ``[N, H]`` rows that predict a token (float32 or bf16).
        weight: ``[V, H]`` output-embedding matrix. ``bias``: optional ``[V]``.
        labels: ``[N]`` token ids in ``[0, V)``; ignored positions must be dropped by the caller.
        temperature: logits are divided by it before the softmax.
        chunk_size: rows per block; peak extra memory is a few ``[chunk_size, V]`` float32 blocks.
        with_entropy: also return ``H = logsumexp(z) - sum_j softmax(z)_j z_j`` per row.
        keep_logits: keep the softmax probabilities for backward instead of recomputing the logits
            (default: when they fit in ``KEEP_LOGITS_BYTES``).

    Returns:
        ``(logps [N], entropy [N] | None)`` in float32 (float64 for float64 inputs), both differentiable
        w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    logps, entropy, _ = selective_log_softmax_ext(hidden, weight, labels, bias=bias, temperature=temperature,
                                                  chunk_size=chunk_size, with_entropy=with_entropy,
                                                  keep_logits=keep_logits)
    return logps, entropy


@torch.no_grad()
def argmax_tokens(hidden: Tensor, weight: Tensor, *, bias: Tensor | None = None,
                  chunk_size: int | None = None) -> Tensor:
    """Most likely token ``argmax_j (h W^T + b)_j`` of each row, chunked (``[N]`` long, no gradient)."""
    chunk_size = auto_chunk_size(weight.shape[0], chunk_size)
    _check(hidden, weight, None, bias, chunk_size, 1.0)
    cdt = _compute_dtype(hidden, weight, bias)
    head = PackedLinear(weight.to(cdt), min(chunk_size, hidden.shape[0]), bias.to(cdt) if bias is not None else None)
    out = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk_size):
        e = min(s + chunk_size, hidden.shape[0])
        out[s:e] = _chunk_logits(hidden[s:e], head, 1.0).argmax(-1)
    return out


def naive_log_softmax(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                      temperature: float = 1.0, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Reference implementation that materializes the full ``[N, V]`` logits (tests only)."""
    cdt = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    z = hidden.to(cdt) @ weight.to(cdt).T
    if bias is not None:
        z = z + bias.to(cdt)
    z = z / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logps = logp_all.gather(1, labels[:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logps, entropy


@torch.no_grad()
def log_sum_sq_probs(hidden: Tensor, weight: Tensor, bias: Tensor | None = None, *, temperature: float = 1.0,
                     chunk_size: int | None = None) -> Tensor:
    """``log sum_v softmax(z)_v^2`` per row of ``z = (h W^T + b) / T``, chunked over rows, no gradient:
    ``logsumexp(2 z) - 2 logsumexp(z)``, the log of the probability that two samples from the row's distribution
    agree (WPO's per-token normalizer). ``hidden [N, H]`` -> ``[N]`` float32 (float64 for float64 inputs)."""
    chunk_size = auto_chunk_size(weight.shape[0], chunk_size)
    _check(hidden, weight, None, bias, chunk_size, temperature)
    cdt = _compute_dtype(hidden, weight, bias)
    head = PackedLinear(weight.to(cdt), min(chunk_size, max(hidden.shape[0], 1)),
                        bias.to(cdt) if bias is not None else None)
    out = hidden.new_empty(hidden.shape[0], dtype=cdt)
    for s in range(0, hidden.shape[0], chunk_size):
        z = _chunk_logits(hidden[s:s + chunk_size], head, temperature)
        lse = torch.logsumexp(z, -1)
        out[s:s + chunk_size] = torch.logsumexp(z.mul_(2.0), -1) - 2.0 * lse
    return out
