"""Padding-free rows through the varlen attention equal each sequence run alone, in values and gradients."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.ops import token_logps
from posttrain.ops.attention import VARLEN_ATTENTION, use_varlen_attention


def _model(kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).float()


def _check(kv_heads: int) -> None:
    model = _model(kv_heads)
    lengths = [7, 1, 13, 4]
    seqs = [torch.randint(0, 300, (n,)) for n in lengths]
    alone = [token_logps(model, s[None]).logps[0] for s in seqs]
    assert use_varlen_attention(model) and model.config._attn_implementation == VARLEN_ATTENTION
    flat = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = token_logps(model, flat, position_ids=pos).logps[0]
    assert torch.allclose(packed, torch.cat(alone), atol=1e-5)
    # gradients equal those of the padded batch through transformers' own SDPA
    packed.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_attn_implementation("sdpa")
    sum(token_logps(model, s[None]).logps.sum() for s in seqs).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-4), n


def test_varlen_attention_isolates_sequences_mha():
    _check(kv_heads=4)


def test_varlen_attention_isolates_sequences_gqa():
    _check(kv_heads=2)


def test_padded_batches_fall_back_to_sdpa():
    model = _model()
    ids = torch.randint(0, 300, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ref = token_logps(model, ids, attention_mask=mask).logps
    use_varlen_attention(model)
    assert torch.allclose(token_logps(model, ids, attention_mask=mask).logps, ref, atol=1e-6)
