"""Variable-length attention for padding-free batches on the SDPA path (CPU, or GPUs without flash-attn).

A padding-free batch is one row `[1, T]` holding several sequences, with `position_ids` restarting at 0 for
each. transformers' SDPA/eager paths isolate such sequences with a dense block-diagonal `[T, T]` mask, which
costs `T^2` attention work and memory although only `sum(L_i^2)` is needed: with 8 sequences of ~300
tokens that is ~8x the attention FLOPs. `varlen_sdpa_attention` instead cuts the row at the sequence starts,
right-pads the pieces into `[n_seq, heads, L_max, head_dim]` and runs causal SDPA once; with causal
masking the right padding never reaches a real query, so no mask is needed. Padded batches (with an
`attention_mask`) fall through to transformers' own SDPA.

Registered as attention implementation `"posttrain_varlen"` (with a mask function that builds no mask for
padding-free rows); `use_varlen_attention(model)` switches a model to it, and `standard_attention(model)`
switches it back to SDPA for a while: decoding with a KV cache and left padding never has padding-free rows,
and there transformers' own SDPA path ran HF generate about twice as fast (measured on CPU).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .wrappers import unwrap_model

__all__ = ["VARLEN_ATTENTION", "varlen_sdpa_attention", "use_varlen_attention", "standard_attention", "sequence_starts"]

VARLEN_ATTENTION = "posttrain_varlen"


def sequence_starts(position_ids: Tensor) -> Tensor:
    """Start offsets of the sequences in a padding-free row (`position_ids` of shape [1, T] or [T])."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0, as_tuple=False).flatten()
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    return starts


def _pieces_index(starts: Tensor, total: int) -> tuple[Tensor, Tensor, int]:
    """(gather index [n, L_max] into the row with -1 for padding, lengths [n], L_max)."""
    ends = torch.cat([starts[1:], starts.new_tensor([total])])
    lengths = ends - starts
    l_max = int(lengths.max())
    offsets = torch.arange(l_max, device=starts.device)
    index = starts[:, None] + offsets[None, :]
    valid = offsets[None, :] < lengths[:, None]
    return torch.where(valid, index, torch.full_like(index, -1)), lengths, l_max


def varlen_sdpa_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention with transformers' interface: q/k/v `[B, heads, T, D]` in, output `[B, T, heads, D]`."""
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or position_ids is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    total = query.shape[2]
    starts = sequence_starts(position_ids)
    if starts.numel() == 1:  # one sequence: plain causal attention
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling, is_causal=True,
                                             enable_gqa=key.shape[1] != query.shape[1])
        return out.transpose(1, 2).contiguous(), None
    index, _, l_max = _pieces_index(starts, total)
    flat_index = index.clamp(min=0).reshape(-1)

    def split(x: Tensor) -> Tensor:  # [1, h, T, D] -> [n, h, L_max, D]
        h, d = x.shape[1], x.shape[3]
        pieces = x[0].index_select(1, flat_index).reshape(h, index.shape[0], l_max, d)
        return pieces.transpose(0, 1)

    out = F.scaled_dot_product_attention(split(query), split(key), split(value), dropout_p=dropout, scale=scaling,
                                         is_causal=True, enable_gqa=key.shape[1] != query.shape[1])
    # [n, h, L_max, D] -> row [1, T, h, D], dropping the padding
    out = out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[3])
    keep = (index.reshape(-1) >= 0).nonzero(as_tuple=False).flatten()
    return out.index_select(0, keep).unsqueeze(0), None


def _varlen_mask(*args: Any, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor | None:
    """No mask for padding-free rows (the attention function isolates sequences); SDPA's mask otherwise."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)


def use_varlen_attention(model: nn.Module) -> bool:
    """Switch a model on the SDPA/eager path to `posttrain_varlen`; returns whether it switched.

    Models on flash-attention (which handles packed rows natively) or other kernels are left alone.
    """
    _register()
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager", VARLEN_ATTENTION):
        return False
    _set_attention(model, VARLEN_ATTENTION)
    return True


def _set_attention(model: nn.Module, name: str) -> None:
    """transformers' own switch where the model accepts `name`, else the config field it reads."""
    inner = unwrap_model(model)  # PEFT, compile and parallel wrappers: the transformers model
    if hasattr(inner, "set_attn_implementation"):
        try:
            inner.set_attn_implementation(name)
            return
        except (ValueError, TypeError, ImportError):
            pass
    inner.config._attn_implementation = name


@contextlib.contextmanager
def standard_attention(model: nn.Module) -> Iterator[None]:
    """Within the block a model on `posttrain_varlen` runs transformers' SDPA (restored after); others as is."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != VARLEN_ATTENTION:
        yield
        return
    _set_attention(model, "sdpa")
    try:
        yield
    finally:
        _set_attention(model, VARLEN_ATTENTION)
