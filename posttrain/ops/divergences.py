"""Chunked per-token divergences between a student's and a teacher's next-token distributions.

Distillation compares two full vocabulary distributions per token. With ``q = softmax(z_S / T)``
(student, logits ``z_S = h_S W_S^T + b_S``) and ``p = softmax(z_T / T)`` (teacher):

- forward KL   ``KL(p || q) = sum_j p_j (log p_j - log q_j)``  (mode covering; classic KD, Hinton et al. 2015)
- reverse KL   ``KL(q || p) = sum_j q_j (log q_j - log p_j)``  (mode seeking; MiniLLM, Gu et al. 2024)
- generalized JSD (GKD, Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
  Self-Generated Mistakes"), with ``m = beta * p + (1 - beta) * q``::

      JSD_beta(p || q) = beta * KL(p || m) + (1 - beta) * KL(q || m)

  ``JSD_beta / beta -> KL(p || q)`` as ``beta -> 0`` and ``JSD_beta / (1 - beta) -> KL(q || p)`` as
  ``beta -> 1``, so, as in the GKD paper's experiments, ``beta = 0`` means forward KL and ``beta = 1``
  reverse KL here (the plain formula would be identically 0 at both ends).

:func:`chunked_divergence` computes one value per row without ever holding ``[N, V]``: forward walks
over chunks of rows and saves only the inputs and the two per-row logsumexps; backward recomputes each
chunk's logits. The logit gradients, derived by hand (``z`` are the temperature-scaled logits)::

    JSD:         dJ/dz_S,i = (1 - beta) * q_i (log q_i - log m_i - KL(q || m))
                 dJ/dz_T,i =      beta  * p_i (log p_i - log m_i - KL(p || m))
    reverse KL:  dJ/dz_S,i = q_i (log q_i - log p_i - KL(q || p)),   dJ/dz_T,i = p_i - q_i
    forward KL:  dJ/dz_S,i = q_i - p_i,   dJ/dz_T,i = p_i (log p_i - log q_i - KL(p || q))

(for JSD the terms from ``m``'s own dependence on ``q`` and ``p`` sum to zero, since ``sum_j m_j = 1``),
then chained through ``1 / T`` and the head's matmul. Under mixed precision (`fast_paths.head_precision`) both
heads' products take bf16 inputs with float32 accumulation, as in `posttrain.ops.logprobs`; everything else is
float32. Only torch is imported here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .fast_paths import head_matmul_dtype
from .logprobs import _chunk_logits
from .packed_linear import PackedLinear, low_precision_mm

__all__ = ["chunked_divergence", "naive_divergence", "DIVERGENCES"]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _kind(kind: str, beta: float) -> str:
    """Resolve ``jsd`` at its ends (beta 0 / 1) to forward / reverse KL."""
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {kind!r}")
    if kind == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
        if beta == 0.0:
            return "forward_kl"
        if beta == 1.0:
            return "reverse_kl"
    return kind


def _rowwise(ls: Tensor, lt: Tensor, kind: str, beta: float) -> Tensor:
    """Per-row divergence from student / teacher log-probs ``[C, V]``."""
    if kind == "forward_kl":
        return (lt.exp() * (lt - ls)).sum(-1)
    if kind == "reverse_kl":
        return (ls.exp() * (ls - lt)).sum(-1)
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))  # log(beta p + (1 - beta) q)
    return beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)


def _side_grad(la: Tensor, lref: Tensor, weight: float) -> Tensor:
    """``weight * d KL(a || ref) / dz_a`` with ``ref`` held fixed: ``a_i (la_i - lref_i - KL)``."""
    pa = la.exp()
    d = la - lref
    kl = (pa * d).sum(-1, keepdim=True)
    return pa.mul_(d.sub_(kl)).mul_(weight)


class _ChunkedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs: Tensor, ws: Tensor, bs: Tensor | None, ht: Tensor, wt: Tensor, bt: Tensor | None,
                kind: str, beta: float, temperature: float, chunk_size: int) -> Tensor:
        cdt = torch.float64 if torch.float64 in (hs.dtype, ws.dtype, ht.dtype, wt.dtype) else torch.float32
        ws_c, wt_c = ws.to(cdt), wt.to(cdt)
        bs_c = bs.to(cdt) if bs is not None else None
        bt_c = bt.to(cdt) if bt is not None else None
        n, mdt = hs.shape[0], head_matmul_dtype() if cdt == torch.float32 else None
        head_s = PackedLinear(ws_c, min(chunk_size, n), bs_c, matmul_dtype=mdt)
        head_t = PackedLinear(wt_c, min(chunk_size, n), bt_c, matmul_dtype=mdt)
        out = hs.new_empty(n, dtype=cdt)
        lse_s = hs.new_empty(n, dtype=cdt)
        lse_t = hs.new_empty(n, dtype=cdt)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            zs = _chunk_logits(hs[s:e], head_s, temperature)
            zt = _chunk_logits(ht[s:e], head_t, temperature)
            lse_s[s:e], lse_t[s:e] = torch.logsumexp(zs, -1), torch.logsumexp(zt, -1)
            ls, lt = zs.sub_(lse_s[s:e, None]), zt.sub_(lse_t[s:e, None])
            out[s:e] = _rowwise(ls, lt, kind, beta)
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, lse_s, lse_t)
        ctx.cfg = (kind, beta, temperature, chunk_size, mdt)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        hs, ws, bs, ht, wt, bt, lse_s, lse_t = ctx.saved_tensors
        kind, beta, temperature, chunk_size, mdt = ctx.cfg
        need = ctx.needs_input_grad
        cdt = lse_s.dtype
        ws_c, wt_c = ws.to(cdt), wt.to(cdt)
        bs_c = bs.to(cdt) if bs is not None else None
        bt_c = bt.to(cdt) if bt is not None else None
        grads: list[Tensor | None] = [None] * 10
        for i, x in enumerate((hs, ws, bs, ht, wt, bt)):
            if need[i]:
                grads[i] = (torch.empty if i in (0, 3) else torch.zeros)(x.shape, dtype=cdt, device=x.device)
        need_s, need_t = any(need[0:3]), any(need[3:6])
        rows = min(chunk_size, hs.shape[0])
        head_s = PackedLinear(ws_c, rows, bs_c, matmul_dtype=mdt)
        head_t = PackedLinear(wt_c, rows, bt_c, matmul_dtype=mdt)
        ws_m, wt_m = (head_s.low, head_t.low) if mdt is not None else (ws_c, wt_c)  # the heads' bf16 copies
        for s in range(0, hs.shape[0], chunk_size):
            e = min(s + chunk_size, hs.shape[0])
            ls = _chunk_logits(hs[s:e], head_s, temperature).sub_(lse_s[s:e, None])
            lt = _chunk_logits(ht[s:e], head_t, temperature).sub_(lse_t[s:e, None])
            gs = gt = None
            if kind == "forward_kl":  # KL(p || q)
                gs = (ls.exp() - lt.exp()) if need_s else None
                gt = _side_grad(lt, ls, 1.0) if need_t else None
            elif kind == "reverse_kl":  # KL(q || p)
                gs = _side_grad(ls, lt, 1.0) if need_s else None
                gt = (lt.exp() - ls.exp()) if need_t else None
            else:
                lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
                gs = _side_grad(ls, lm, 1.0 - beta) if need_s else None
                gt = _side_grad(lt, lm, beta) if need_t else None
            scale = g[s:e, None].to(cdt) / temperature
            for gz, (hi, wi, bi), (h, w_m) in ((gs, (0, 1, 2), (hs, ws_m)), (gt, (3, 4, 5), (ht, wt_m))):
                if gz is None:
                    continue
                gz = gz.mul_(scale)
                if need[hi]:
                    grads[hi][s:e] = low_precision_mm(gz, w_m, mdt)
                if need[wi] and mdt is None:
                    grads[wi].addmm_(gz.T, h[s:e].to(cdt))
                elif need[wi]:
                    grads[wi] += low_precision_mm(gz.T, h[s:e].to(cdt), mdt)
                if need[bi]:
                    grads[bi] += gz.sum(0)
        for i, x in enumerate((hs, ws, bs, ht, wt, bt)):
            if grads[i] is not None:
                grads[i] = grads[i].to(x.dtype)
        return tuple(grads)


def chunked_divergence(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                       teacher_weight: Tensor, *, kind: str = "jsd", beta: float = 0.5,
                       student_bias: Tensor | None = None, teacher_bias: Tensor | None = None,
                       temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """Per-row divergence ``[N]`` (float32) between student and teacher next-token distributions.

    Args:
        student_hidden / teacher_hidden: ``[N, H_s]`` / ``[N, H_t]``, row ``i`` of both predicting the same token.
        student_weight / teacher_weight: output heads ``[V, H_s]`` / ``[V, H_t]`` over the same vocabulary.
        kind: ``"forward_kl"`` (``KL(teacher || student)``), ``"reverse_kl"`` (``KL(student || teacher)``) or
            ``"jsd"`` (generalized JSD with ``beta``; 0 gives forward KL, 1 reverse KL; see module docstring).
        temperature: both logits are divided by it.
        chunk_size: rows per block; extra memory is a few ``[chunk_size, V]`` blocks.

    Gradients flow to whichever inputs require grad (usually the student side only).
    """
    kind = _kind(kind, beta)
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2 or student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"student and teacher hidden must be [N, H] with the same N, got "
                         f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student and teacher vocabularies differ: V={student_weight.shape[0]} vs "
                         f"V={teacher_weight.shape[0]}; distillation needs a shared vocabulary")
    for name, h, w in (("student", student_hidden, student_weight), ("teacher", teacher_hidden, teacher_weight)):
        if h.shape[1] != w.shape[1]:
            raise ValueError(f"{name} hidden size {h.shape[1]} does not match its head's {w.shape[1]}")
    if chunk_size < 1 or temperature <= 0:
        raise ValueError(f"need chunk_size >= 1 and temperature > 0, got {chunk_size} and {temperature}")
    return _ChunkedDivergence.apply(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                    teacher_bias, kind, float(beta), float(temperature), int(chunk_size))


def naive_divergence(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                     teacher_weight: Tensor, *, kind: str = "jsd", beta: float = 0.5,
                     student_bias: Tensor | None = None, teacher_bias: Tensor | None = None,
                     temperature: float = 1.0) -> Tensor:
    """Reference: the same divergence from full ``[N, V]`` logits through autograd (tests only)."""
    kind = _kind(kind, beta)
    cdt = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    zs = student_hidden.to(cdt) @ student_weight.to(cdt).T
    zt = teacher_hidden.to(cdt) @ teacher_weight.to(cdt).T
    if student_bias is not None:
        zs = zs + student_bias.to(cdt)
    if teacher_bias is not None:
        zt = zt + teacher_bias.to(cdt)
    q, p = torch.softmax(zs / temperature, -1), torch.softmax(zt / temperature, -1)
    if kind == "forward_kl":
        return (p * (p.log() - q.log())).sum(-1)
    if kind == "reverse_kl":
        return (q * (q.log() - p.log())).sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)
