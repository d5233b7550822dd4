"""Shared machinery of the offline preference trainers (DPO, CPO, ORPO, KTO, BCO).

- :func:`tokenize_completions`: a prompt and one or more completions to token ids, with truncation.
- :class:`SequenceCollator`: prompt+completion sequences (for DPO: every chosen, then every rejected) packed
  into one padding-free row with per-sequence ``position_ids``, so no compute is spent on padding and
  sequences never attend to each other; or classic right-padded rows with ``padding_free=False``.
- :func:`sequence_logps`: one forward of the whole packed batch, per-token log-probs through
  :func:`posttrain.ops.token_logps` (no ``[batch, length, vocab]`` logits), reduced to per-sequence sums,
  with the per-token values unpacked to ``[num_sequences, max_completion_len]`` for LD-DPO and a cheap mean
  logit per sequence (``h . mean_v(W)``, the mean over the vocabulary of the logits, without the logits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..data import tokenize_prompt_completion
from ..data.padding_free import padding_free_row
from ..ops import token_logps
from ..ops.forward import output_head
from ..ops.logprobs import log_sum_sq_probs

__all__ = ["tokenize_completions", "SequenceCollator", "SequenceLogps", "sequence_logps"]


def tokenize_completions(
    tokenizer: Any,
    prompt: Any,
    completions: Sequence[Any],
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    truncation_mode: str = "keep_start",
    tools: list[dict] | None = None,
) -> tuple[list[int], list[list[int]], bool]:
    """Tokenize ``prompt`` with each completion (plain or conversational); returns ``(prompt_ids,
    completion_ids_list, truncated)``.

    The prompt keeps its last ``max_prompt_length`` tokens (the end is what the completion continues);
    then each completion is cut so that prompt + completion fits ``max_length``. A prompt that alone exceeds
    ``max_length`` keeps its last ``max_length // 2`` tokens so every completion keeps some tokens.
    Each completion first keeps at most ``max_completion_length`` tokens. ``truncation_mode="keep_end"`` cuts
    the prompt's start instead (it keeps at least one token) until the longest completion fits.
    """
    prompt_ids: list[int] | None = None
    outs: list[list[int]] = []
    for completion in completions:
        out = tokenize_prompt_completion(tokenizer, prompt, completion, tools=tools)
        prompt_ids = out["prompt_ids"] if prompt_ids is None else prompt_ids
        outs.append(list(out["completion_ids"]))
    prompt_ids = list(prompt_ids or [])
    truncated = False
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids, truncated = prompt_ids[len(prompt_ids) - max_prompt_length:], True
    if max_completion_length is not None:
        for i, ids in enumerate(outs):
            if len(ids) > max_completion_length:
                outs[i], truncated = ids[:max_completion_length], True
    if max_length is not None and truncation_mode == "keep_end" and outs:
        keep = max(1, max_length - max(len(ids) for ids in outs))
        if len(prompt_ids) > keep:
            prompt_ids, truncated = prompt_ids[len(prompt_ids) - keep:], True
    if max_length is not None:
        if len(prompt_ids) >= max_length:
            keep = max(1, max_length // 2)
            prompt_ids, truncated = prompt_ids[-keep:], True
        room = max_length - len(prompt_ids)
        for i, ids in enumerate(outs):
            if len(ids) > room:
                outs[i], truncated = ids[:room], True
    return prompt_ids, outs, truncated


class SequenceCollator:
    """Collates rows into prompt+completion sequences, packed (default) or right-padded.

    ``sequences(features) -> list[(prompt_ids, completion_ids)]`` says which sequences a batch holds and in
    which order; subclasses (or the ``fields`` argument) choose it. Every other numeric field listed in
    ``passthrough`` is stacked into a tensor (e.g. precomputed reference log-probs, labels).

    Output: ``input_ids``, ``position_ids`` (packed) or ``attention_mask`` (padded), ``completion_mask``
    (bool), ``seq_index`` (which sequence each token belongs to, -1 for padding; completion tokens only are
    ever reduced), ``num_sequences``.
    """

    def __init__(
        self,
        pad_token_id: int,
        fields: Sequence[tuple[str, str]],
        *,
        padding_free: bool = True,
        passthrough: Sequence[str] = (),
        pad_to_multiple_of: int | None = None,
    ) -> None:
        self.pad_token_id = pad_token_id
        self.fields = list(fields)  # (prompt field, completion field) per sequence group, in order
        self.padding_free = padding_free
        self.passthrough = list(passthrough)
        self.pad_to_multiple_of = pad_to_multiple_of

    def sequences(self, features: list[dict]) -> list[tuple[list[int], list[int]]]:
        return [(f[p], f[c]) for p, c in self.fields for f in features]

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        seqs = self.sequences(features)
        batch = self._pack(seqs) if self.padding_free else self._pad(seqs)
        batch["num_sequences"] = len(seqs)
        for name in self.passthrough:
            if name in features[0]:
                batch[name] = torch.tensor([f[name] for f in features])
        return batch

    def _row_length(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if not m else -(-n // m) * m

    def _pack(self, seqs: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
        """All sequences in one row ``[1, T]`` with ``position_ids`` restarting at 0 for each (the contract's
        padding-free layout; the varlen attention of :mod:`posttrain.ops.attention` keeps them apart)."""
        width = self._row_length(sum(len(p) + len(c) for p, c in seqs))
        # Trailing padding (pad_to_multiple_of) forms its own ignored segment: positions restart at 0.
        row = padding_free_row([p for p, _ in seqs], [c for _, c in seqs], width=width, pad_token_id=self.pad_token_id)
        return {"input_ids": row.input_ids, "position_ids": row.position_ids, "completion_mask": row.completion_mask,
                "seq_index": row.seq_index}

    def _pad(self, seqs: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
        width = self._row_length(max(len(p) + len(c) for p, c in seqs))
        shape = (len(seqs), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        completion_mask = torch.zeros(shape, dtype=torch.bool)
        seq_index = torch.full(shape, -1, dtype=torch.long)
        for i, (p, c) in enumerate(seqs):
            n = len(p) + len(c)
            input_ids[i, :n] = torch.tensor(p + c, dtype=torch.long)
            attention_mask[i, :n] = 1
            completion_mask[i, len(p):n] = True
            seq_index[i, :n] = i
        return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
                "seq_index": seq_index}


@dataclass
class SequenceLogps:
    """Per-sequence results of one forward over a collated batch (sequence order as collated)."""

    logps: torch.Tensor  # [S] summed completion log-probs
    lengths: torch.Tensor  # [S] completion tokens that have a log-prob
    token_logps: torch.Tensor  # [S, Lc] per-token completion log-probs, left-aligned, 0-padded
    token_mask: torch.Tensor  # [S, Lc] bool
    logits_mean: torch.Tensor | None = None  # [S] mean over completion tokens of the mean logit over the vocab
    token_log_sum_sq: torch.Tensor | None = None  # [S, Lc] log sum_v p_v^2 per completion token (WPO), no grad


def sequence_logps(
    model: torch.nn.Module,
    batch: dict[str, Any],
    *,
    chunk_size: int = 1024,
    with_logits_mean: bool = False,
    with_log_sum_sq: bool = False,
    temperature: float = 1.0,
) -> SequenceLogps:
    """Run ``model`` once over a :class:`SequenceCollator` batch and reduce log-probs per sequence."""
    out = token_logps(
        model, batch["input_ids"], attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"), mask=batch["completion_mask"], chunk_size=chunk_size,
        temperature=temperature, return_hidden=with_logits_mean or with_log_sum_sq,
    )
    mask = out.mask if out.mask is not None else batch["completion_mask"]
    n_seq = int(batch["num_sequences"])
    seq = batch["seq_index"][mask]  # [N] sequence of each scored token, row-major order
    values = out.logps[mask]
    lengths = torch.bincount(seq, minlength=n_seq)
    # Position of each token within its completion: tokens of one sequence are contiguous in row-major
    # order, so a stable sort by sequence keeps their order; subtract each sequence's start offset.
    order = torch.argsort(seq, stable=True)
    starts = torch.cumsum(lengths, 0) - lengths
    pos = torch.empty_like(seq)
    pos[order] = torch.arange(seq.numel(), device=seq.device) - starts[seq[order]]
    width = int(lengths.max()) if n_seq else 0
    token_lp = values.new_zeros(n_seq, width).index_put((seq, pos), values)
    token_mask = torch.zeros(n_seq, width, dtype=torch.bool, device=values.device)
    token_mask[seq, pos] = True
    logits_mean = log_sum_sq = None
    if out.hidden is not None and (with_logits_mean or with_log_sum_sq):
        weight, bias = output_head(model)
        with torch.no_grad():
            rows = out.hidden[:, :-1][mask[:, 1:]]  # hidden state predicting each scored token
            if with_logits_mean:
                tok_mean = rows.float() @ weight.float().mean(0) + (bias.float().mean() if bias is not None else 0.0)
                logits_mean = torch.zeros(n_seq, device=values.device).index_add(0, seq, tok_mean)
                logits_mean = logits_mean / lengths.clamp(min=1)
            if with_log_sum_sq:
                per_token = log_sum_sq_probs(rows, weight, bias, temperature=temperature, chunk_size=chunk_size)
                log_sum_sq = per_token.new_zeros(n_seq, width).index_put((seq, pos), per_token)
    return SequenceLogps(token_lp.sum(-1), lengths, token_lp, token_mask, logits_mean, log_sum_sq)
