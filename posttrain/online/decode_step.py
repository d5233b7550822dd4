"""One decode step of a Llama-family decoder on a preallocated KV cache, without the HF forward's machinery.

For a small model on CPU, most of a decode step of ``LlamaModel.forward`` is not the model's math: the
dynamic cache concatenates every layer's keys and values onto a growing tensor at every token (the whole
cache copied per step), and each call builds a 4D attention mask and dispatches through the attention
interface. `KVDecoder` writes each token's keys and values into buffers sized for the whole rollout and calls
the layers' own submodules (norms, projections, MLP, rotary embedding) in the order the HF layer does, so
PEFT adapters on the projections and any norm or rotary variant of these classes still apply; on the benchmark
model a rollout runs about 1.25x faster here than on the HF decoder's dynamic cache (benchmarks/README.md).

On CPU the projections' float32 weights (q/k/v/o and the gate/up/down MLP of plain ``nn.Linear`` layers of at
least 512 x 512) are packed once per rollout for oneDNN (`posttrain.ops.packed_linear`), as vLLM's CPU backend
does: MKL's ``F.linear`` runs these B-row products slower on some CPUs (benchmarks/README.md). The packed
copies live as long as the decoder (one rollout chunk). Adapters (PEFT's LoRA layers are not plain
``nn.Linear``) and small weights run through the modules themselves.

Only decoder classes whose layers are exactly "pre-norm attention + pre-norm MLP, rotary q/k, optional
per-head q/k norm" are run (`supports_kv_decoder`); sliding-window layers shorter than the rollout, or any
other architecture, keep the HF decoder.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # the same rotation in all four

from ..ops import packed_linear
from ..ops.fast_paths import head_matmul_dtype
from ..ops.packed_linear import PackedLinear

__all__ = ["KVDecoder", "supports_kv_decoder", "KV_DECODER_CLASSES"]

# Decoder stacks whose forward is embed -> rotary -> [x += attn(norm(x)); x += mlp(norm(x))] * L -> norm.
KV_DECODER_CLASSES = frozenset({"LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model"})
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
_LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
# MLPs whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)).
_GATED_MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})


def supports_kv_decoder(decoder: nn.Module, total_length: int) -> bool:
    """Whether `KVDecoder` runs ``decoder`` exactly for sequences of up to ``total_length`` tokens."""
    if type(decoder).__name__ not in KV_DECODER_CLASSES:
        return False
    if not all(hasattr(decoder, part) for part in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    config = decoder.config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    windowed = "sliding_attention" in layer_types or getattr(config, "use_sliding_window", window is not None)
    if window is not None and windowed and window < total_length:
        return False
    for layer in decoder.layers:
        if not all(hasattr(layer, part) for part in _LAYER_PARTS):
            return False
        if not all(hasattr(layer.self_attn, part) for part in _ATTENTION_PARTS):
            return False
    return True


class KVDecoder:
    """Decodes one token per row per `step` on key/value buffers of ``[layers, B, kv_heads, length, head_dim]``.

    ``prefill`` runs the prompt through the HF decoder once (its masks handle the left padding) and copies the
    resulting cache into the buffers; each `step` then appends one token's keys and values in place. Left
    padding stays masked by an additive ``[B, 1, 1, length]`` mask.
    """

    def __init__(self, decoder: nn.Module, batch: int, total_length: int) -> None:
        self.decoder = decoder
        config = decoder.config
        attn = decoder.layers[0].self_attn
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(attn, "head_dim", None) or config.hidden_size // self.heads
        weight = decoder.embed_tokens.weight
        shape = (len(decoder.layers), batch, self.kv_heads, total_length, self.head_dim)
        self.keys = weight.new_zeros(shape)
        self.values = weight.new_zeros(shape)
        self.mask = weight.new_zeros((batch, 1, 1, total_length))
        self.length = 0
        self.layers = [_LayerProjections(layer, batch) for layer in decoder.layers]

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        """Run the prompt ``[B, L]``; returns the last position's hidden state ``[B, H]``."""
        cache = DynamicCache()
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=cache, use_cache=True)
        length = input_ids.shape[1]
        for i, layer in enumerate(cache.layers):
            self.keys[i, :, :, :length] = layer.keys
            self.values[i, :, :, :length] = layer.values
        self.mask[:, 0, 0, :length].masked_fill_(attention_mask == 0, torch.finfo(self.mask.dtype).min)
        self.length = length
        return out.last_hidden_state[:, -1]

    def step(self, tokens: Tensor, position_ids: Tensor) -> Tensor:
        """Append ``tokens [B]`` at ``position_ids [B, 1]``; returns their hidden states ``[B, H]``."""
        decoder, cur = self.decoder, self.length
        batch = tokens.shape[0]
        x = decoder.embed_tokens(tokens[:, None])
        cos, sin = decoder.rotary_emb(x, position_ids)
        mask = self.mask[..., : cur + 1]
        gqa = self.kv_heads != self.heads
        for i, (layer, proj) in enumerate(zip(decoder.layers, self.layers)):
            attn = layer.self_attn
            normed = layer.input_layernorm(x)
            q = proj.q(normed).view(batch, 1, self.heads, self.head_dim)
            k = proj.k(normed).view(batch, 1, self.kv_heads, self.head_dim)
            v = proj.v(normed).view(batch, 1, self.kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3: per-head RMS norm before the rotation
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            self.keys[i, :, :, cur : cur + 1] = k
            self.values[i, :, :, cur : cur + 1] = v.transpose(1, 2)
            out = F.scaled_dot_product_attention(q, self.keys[i, :, :, : cur + 1], self.values[i, :, :, : cur + 1],
                                                 attn_mask=mask, scale=attn.scaling, enable_gqa=gqa)
            x = x + proj.o(out.transpose(1, 2).reshape(batch, 1, self.heads * self.head_dim))
            x = x + proj.mlp(layer.post_attention_layernorm(x))
        self.length = cur + 1
        return decoder.norm(x)[:, -1]


Projection = Callable[[Tensor], Tensor]


def _projection(module: nn.Module, rows: int) -> Projection:
    """``module`` itself, or for a plain ``nn.Linear`` whose weight is worth it, its oneDNN-packed product (under
    mixed precision, its product in bf16 from a copy of the weight cast once)."""
    if type(module) is nn.Linear:
        packed = PackedLinear(module.weight, rows, module.bias, packed_linear.MIN_PACKED_PROJECTION_ELEMENTS,
                              matmul_dtype=head_matmul_dtype())
        if packed.packed is not None or packed.low is not None:
            return lambda x: packed(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)
    return module


class _LayerProjections:
    """One layer's q/k/v/o projections and MLP for decode steps of ``rows`` rows (packed where it pays)."""

    def __init__(self, layer: nn.Module, rows: int) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.q, self.k, self.v, self.o = (_projection(getattr(attn, name), rows) for name in _ATTENTION_PARTS)
        self.mlp: Projection = mlp
        if type(mlp).__name__ in _GATED_MLP_CLASSES and \
                all(hasattr(mlp, part) for part in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            gate, up, down = (_projection(getattr(mlp, name), rows) for name in ("gate_proj", "up_proj", "down_proj"))
            if any(f is not m for f, m in zip((gate, up, down), (mlp.gate_proj, mlp.up_proj, mlp.down_proj))):
                act = mlp.act_fn
                self.mlp = lambda x: down(act(gate(x)) * up(x))
