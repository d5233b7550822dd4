"""The HF engine's own decode loop: prefill, then one token per step on the KV cache, no ``generate``.

``model.generate`` spends much of a small model's decode step outside the model: per step it runs its
logits-processor and stopping-criteria machinery, and (with posttrain's sampler, which must see the raw
logits) a one-hot score row that generate then takes the argmax of. This loop calls the decoder and the
output head directly, so each step is one decoder step, one head matmul on the last hidden state, and
`SamplingProcessor.draw`. Llama-family decoders step on a preallocated KV cache (`KVDecoder`), and on CPU the
head's weight is packed once per rollout for oneDNN (`posttrain.ops.packed_linear`); under mixed precision
(`posttrain.ops.fast_paths.head_precision`) the head and the `KVDecoder` projections multiply in bf16 from a copy
cast once per rollout, and the logits reach the sampler in float32.

On the benchmark model this loop decodes about 1.5x faster than the HF decoder with a plain head, and with the
head and the projections packed it reaches about vLLM's CPU backend's speed on the same rollouts
(benchmarks/README.md).

Used for plain decoder-only causal LMs (a decoder plus a linear output head, dynamic KV cache);
anything else (logit soft-capping, an adapter on the head, recurrent or encoder-decoder models) keeps
``model.generate`` (see `supports_decode_loop`).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
from torch import Tensor, nn

from ..ops.fast_paths import fast_paths_enabled, head_matmul_dtype
from ..ops.forward import decoder_module, output_head
from ..ops.packed_linear import PackedLinear
from ..ops.wrappers import unwrap_model
from .decode_step import KVDecoder, supports_kv_decoder

__all__ = ["supports_decode_loop", "decode", "DrawsTokens"]


class DrawsTokens(Protocol):
    """What `decode` needs from its sampler (`posttrain.online.engine_hf.SamplingProcessor`)."""

    def draw(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """The next token ``[B]`` of each row from its float32 logits ``scores [B, V]``."""


def supports_decode_loop(model: nn.Module) -> bool:
    """Whether `decode` can run ``model``: a decoder-only LM with a plain linear head and a dynamic cache."""
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    dynamic_cache = getattr(base, "_supports_default_dynamic_cache", None)
    if callable(dynamic_cache) and not dynamic_cache():
        return False
    try:
        output_head(base)
        decoder_module(base)
    except (NotImplementedError, ValueError):
        return False
    return True


class _HFDecoder:
    """`KVDecoder`'s interface on the HF decoder itself with a dynamic cache (any other architecture)."""

    def __init__(self, decoder: nn.Module, attention_mask: Tensor, max_new_tokens: int) -> None:
        self.decoder, self.cache = decoder, None
        batch, length = attention_mask.shape
        self.mask = attention_mask.new_ones((batch, length + max_new_tokens))
        self.mask[:, :length] = attention_mask
        self.length = length

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=True)
        self.cache = out.past_key_values
        return out.last_hidden_state[:, -1]

    def step(self, tokens: Tensor, position_ids: Tensor) -> Tensor:
        self.length += 1
        out = self.decoder(input_ids=tokens[:, None], attention_mask=self.mask[:, : self.length],
                           position_ids=position_ids, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.last_hidden_state[:, -1]


@torch.inference_mode()
def decode(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, processor: DrawsTokens,
           max_new_tokens: int, stop_token_ids: Sequence[int], pad_token_id: int) -> Tensor:
    """Sample up to ``max_new_tokens`` per row of left-padded ``input_ids [B, L]``; returns ``[B, L + n]``.

    ``processor.draw(ids, scores)`` picks each step's tokens from the float32 logits (and records their
    log-probs). A row that has produced a stop token gets ``pad_token_id`` after it, as in ``generate``;
    the loop ends when every row has stopped or after ``max_new_tokens`` tokens. Llama-family decoders step on
    a preallocated cache (`KVDecoder`), others on the HF decoder's dynamic cache.
    """
    base = unwrap_model(model)
    decoder = decoder_module(base)
    weight, bias = output_head(base)
    batch, length = input_ids.shape
    head = PackedLinear(weight, batch, bias, matmul_dtype=head_matmul_dtype())  # bf16 under mixed precision
    total = length + max_new_tokens
    runner = (KVDecoder(decoder, batch, total) if fast_paths_enabled() and supports_kv_decoder(decoder, total)
              else _HFDecoder(decoder, attention_mask, max_new_tokens))
    sequences = torch.full((batch, total), pad_token_id, dtype=torch.long, device=input_ids.device)
    sequences[:, :length] = input_ids
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    stops = torch.tensor(list(stop_token_ids), dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    hidden = runner.prefill(input_ids, attention_mask, positions)
    position = positions[:, -1:]
    cur = length
    for step in range(max_new_tokens):
        tokens = processor.draw(sequences[:, :cur], head(hidden).float())
        tokens = tokens.masked_fill(finished, pad_token_id)
        sequences[:, cur] = tokens
        cur += 1
        if stops.numel():
            finished |= torch.isin(tokens, stops)
            if bool(finished.all()):
                break
        if step + 1 == max_new_tokens:
            break
        position = position + 1
        hidden = runner.step(tokens, position)
    return sequences[:, :cur]
