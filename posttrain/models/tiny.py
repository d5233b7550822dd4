"""Tiny Llama models built from a spec string, so everything runs with no model hub.

`build_tiny("small")` gives a seeded `LlamaForCausalLM` plus the project tokenizer. Llama because
transformers, PEFT and vLLM all support it; head_dim 64 by default because vLLM's attention kernels
expect a standard head size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers import PreTrainedTokenizerFast

from .tokenizer import IM_END, build_tokenizer

__all__ = ["TINY_SIZES", "build_tiny", "parse_tiny_spec", "tiny_config"]

# Named sizes. `vocab=None` means "the tokenizer's size".
TINY_SIZES: dict[str, dict[str, Any]] = {
    # For fast unit tests: ~0.23M parameters.
    "nano": dict(hidden=64, layers=2, heads=1, intermediate=176, vocab=None, tie=1),
    # A general small model (head_dim 64, so vLLM can serve it): ~3.7M parameters.
    "small": dict(hidden=256, layers=4, heads=4, intermediate=688, vocab=None, tie=1),
    # The quickstart's model: 2 wide layers with 8 heads of 32 learn the arithmetic task's digit copying in a
    # few hundred steps on CPU, where `small` sat on a loss plateau for 500-900 steps (measured: 83% held-out after 400 steps here, 10-24% after 1000 there). HF engine
    # only: vLLM's CPU attention wants head_dim 64. ~2.2M parameters.
    "quick": dict(hidden=256, layers=2, heads=8, intermediate=688, vocab=None, tie=1),
    # Benchmarks of the logits path: a realistic vocab (32768) over a small body, untied head.
    "bench": dict(hidden=256, layers=4, heads=4, intermediate=688, vocab=32768, tie=0),
}

_INT_KEYS = {"hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "max_pos", "tie",
             "tokenizer_vocab"}
_FLOAT_KEYS = {"rope_theta"}
TOKENIZER_VOCAB = 2048


def _default_intermediate(hidden: int) -> int:
    """SwiGLU width ~8/3 of hidden, rounded up to a multiple of 16 (256 -> 688)."""
    return int(math.ceil(hidden * 8 / 3 / 16) * 16)


def _parse_fields(spec: str) -> dict[str, Any]:
    spec = spec.strip()
    if spec.startswith("tiny:"):
        spec = spec[len("tiny:"):]
    fields: dict[str, Any] = {}
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if parts and "=" not in parts[0]:
        name = parts.pop(0)
        if name not in TINY_SIZES:
            raise ValueError(f"unknown tiny size {name!r}; expected one of {sorted(TINY_SIZES)} or key=value pairs")
        fields.update(TINY_SIZES[name])
    for part in parts:
        if "=" not in part:
            raise ValueError(f"bad tiny spec part {part!r} in {spec!r}: expected key=value")
        key, value = (s.strip() for s in part.split("=", 1))
        if key in _INT_KEYS:
            try:
                fields[key] = int(value)
            except ValueError:
                raise ValueError(f"tiny spec {key}={value!r}: expected an integer") from None
        elif key in _FLOAT_KEYS:
            fields[key] = float(value)
        else:
            raise ValueError(f"unknown tiny spec key {key!r}; expected one of {sorted(_INT_KEYS | _FLOAT_KEYS)}")
    return fields


def parse_tiny_spec(spec: str, tokenizer_vocab: int | None = None) -> dict[str, Any]:
    """Turn a spec (`"small"`, `"nano,layers=3"`, `"hidden=256,layers=2,heads=4"`) into LlamaConfig kwargs.

    Keys: hidden, layers, heads (default hidden // 64), kv_heads (default heads), head_dim (default
    hidden // heads), intermediate (default ~8/3 hidden), vocab (default: tokenizer size), max_pos
    (default 2048), tie (0|1, default 1), rope_theta, tokenizer_vocab (the project tokenizer's
    requested size, default 2048). Token ids are not included (see `tiny_config`).
    """
    f = _parse_fields(spec)
    hidden = f.get("hidden", 256)
    heads = f.get("heads", max(1, hidden // 64))
    head_dim = f.get("head_dim", hidden // heads if hidden % heads == 0 else 64)
    vocab = f.get("vocab") or tokenizer_vocab or f.get("tokenizer_vocab") or TOKENIZER_VOCAB
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=f.get("intermediate") or _default_intermediate(hidden),
        num_hidden_layers=f.get("layers", 2),
        num_attention_heads=heads,
        num_key_value_heads=f.get("kv_heads", heads),
        head_dim=head_dim,
        max_position_embeddings=f.get("max_pos", 2048),
        tie_word_embeddings=bool(f.get("tie", 1)),
        hidden_act="silu",
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        attention_bias=False,
        mlp_bias=False,
    )
    if "rope_theta" in f:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": f["rope_theta"]}
    if heads % kwargs["num_key_value_heads"] != 0:
        raise ValueError(f"tiny spec: heads={heads} must be a multiple of kv_heads={kwargs['num_key_value_heads']}")
    return kwargs


def _tokenizer_vocab(spec: str) -> int:
    return _parse_fields(spec).get("tokenizer_vocab", TOKENIZER_VOCAB)


def tiny_config(spec: str, tokenizer: PreTrainedTokenizerFast | None = None) -> LlamaConfig:
    """The `LlamaConfig` for `spec`, with pad/eos/bos ids from the project tokenizer."""
    tokenizer = tokenizer or build_tokenizer(_tokenizer_vocab(spec))
    kwargs = parse_tiny_spec(spec, tokenizer_vocab=len(tokenizer))
    if kwargs["vocab_size"] < len(tokenizer):
        raise ValueError(f"tiny spec vocab={kwargs['vocab_size']} is smaller than the tokenizer "
                         f"({len(tokenizer)} tokens)")
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    config = LlamaConfig(pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, bos_token_id=bos, **kwargs)
    config.dtype = torch.float32
    return config


def build_tiny(spec: str, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build a seeded float32 `LlamaForCausalLM` from `spec` and return it with the project tokenizer.

    Same spec and seed give the same weights; the global torch RNG is left untouched. The generation
    config stops on `<|endoftext|>` and on `<|im_end|>` (end of a chat turn) and pads with eos.
    """
    tokenizer = build_tokenizer(_tokenizer_vocab(spec))
    config = tiny_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, im_end],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.eval()
    return model, tokenizer
