"""posttrain.ops: chunked selective log-softmax, token_logps on a real (tiny) Llama, memory."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.ops import argmax_tokens, output_head, selective_log_softmax, selective_log_softmax_ext, token_logps
from posttrain.ops.wrappers import unwrap_model
from posttrain.ops.logprobs import naive_log_softmax

from _memory import peak_kib


def written_out(hidden, weight, labels, bias=None, temperature=1.0):
    """log p(label) and entropy from full logits, written with explicit exp/sum (independent of the op)."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z / temperature
    zmax = z.max(-1, keepdim=True).values
    lse = zmax.squeeze(-1) + torch.log(torch.exp(z - zmax).sum(-1))
    logp = z[torch.arange(len(labels)), labels] - lse
    p = torch.exp(z - lse[:, None])
    entropy = -(p * (z - lse[:, None])).sum(-1)
    return logp, entropy


def make(n=37, h=8, v=50, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g, dtype=dtype).requires_grad_()
    bias = torch.randn(v, generator=g, dtype=dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, bias, labels


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("keep_logits", [False, True], ids=["recompute", "kept"])
def test_values_and_gradients_match_full_logits(dtype, tol, chunk_size, temperature, keep_logits):
    hidden, weight, bias, labels = make(dtype=dtype)
    logp, ent = selective_log_softmax(hidden, weight, labels, bias=bias, temperature=temperature,
                                      chunk_size=chunk_size, with_entropy=True, keep_logits=keep_logits)
    assert logp.dtype == dtype and ent.dtype == dtype and logp.shape == (37,)
    ref_logp, ref_ent = written_out(hidden, weight, labels, bias, temperature)
    torch.testing.assert_close(logp.double(), ref_logp, atol=tol, rtol=tol)
    torch.testing.assert_close(ent.double(), ref_ent, atol=tol, rtol=tol)

    g = torch.Generator().manual_seed(1)
    w_lp, w_ent = torch.randn(37, generator=g, dtype=dtype), torch.randn(37, generator=g, dtype=dtype)
    grads = torch.autograd.grad((logp * w_lp).sum() + (ent * w_ent).sum(), (hidden, weight, bias))
    ref_grads = torch.autograd.grad((ref_logp * w_lp.double()).sum() + (ref_ent * w_ent.double()).sum(),
                                    (hidden, weight, bias))
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want.double(), atol=tol * 10, rtol=tol * 10)


def test_kept_logits_serve_one_backward_and_a_second_one_recomputes():
    """Kept logits are turned into the gradient in place; a retained graph's second backward must still be
    right (it recomputes), and logp-only gradients (no entropy term) take the in-place path."""
    hidden, weight, bias, labels = make()
    logp, _ = selective_log_softmax(hidden, weight, labels, bias=bias, chunk_size=8, keep_logits=True)
    first = torch.autograd.grad(logp.sum(), (hidden, weight, bias), retain_graph=True)
    second = torch.autograd.grad(logp.sum(), (hidden, weight, bias))
    ref_logp, _ = written_out(hidden, weight, labels, bias)
    want = torch.autograd.grad(ref_logp.sum(), (hidden, weight, bias))
    for a, b, w in zip(first, second, want):
        torch.testing.assert_close(a, w, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(b, w, atol=1e-9, rtol=1e-9)


def test_kept_probability_buffer_is_reused_only_once_its_backward_is_done():
    """The kept [N, V] buffer goes back to a one-slot pool after its backward; a forward takes it from there,
    and two graphs alive at once never share it."""
    from posttrain.ops import logprobs

    logprobs._spare_probs.clear()
    hidden, weight, bias, labels = make()
    ref = torch.autograd.grad(written_out(hidden, weight, labels, bias)[0].sum(), (hidden, weight, bias))
    live = [selective_log_softmax(hidden, weight, labels, bias=bias, chunk_size=8, keep_logits=True)[0]
            for _ in range(2)]
    assert not logprobs._spare_probs
    for logp in live:
        for got, want in zip(torch.autograd.grad(logp.sum(), (hidden, weight, bias)), ref):
            torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    assert len(logprobs._spare_probs) == 1
    spare = logprobs._spare_probs[0].data_ptr()
    smaller = hidden.detach()[:20].mul(0.5).requires_grad_()  # fewer rows: a view of the spare, stale data in it
    logp, ent = selective_log_softmax(smaller, weight, labels[:20], bias=bias, chunk_size=8, with_entropy=True,
                                      keep_logits=True)
    assert not logprobs._spare_probs
    want_logp, want_ent = written_out(smaller, weight, labels[:20], bias)
    inputs = (smaller, weight, bias)
    for got, want in zip(torch.autograd.grad((logp + 0.3 * ent).sum(), inputs),
                         torch.autograd.grad((want_logp + 0.3 * want_ent).sum(), inputs)):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    assert [t.data_ptr() for t in logprobs._spare_probs] == [spare]


@pytest.mark.parametrize("keep_logits", [False, True], ids=["recompute", "kept"])
def test_gradcheck_logp_and_entropy_separately(keep_logits):
    hidden, weight, bias, labels = make(n=9, h=4, v=11)
    for which in (0, 1):
        def f(h, w, b):
            out = selective_log_softmax(h, w, labels, bias=b, temperature=1.3, chunk_size=4, with_entropy=True,
                                        keep_logits=keep_logits)
            return out[which]
        # gradcheck backpropagates through one graph repeatedly: the kept probabilities serve the first
        # backward, later ones recompute, equal to float64 rounding (hence nondet_tol)
        assert torch.autograd.gradcheck(f, (hidden, weight, bias), nondet_tol=1e-12)


def test_gradients_when_only_some_inputs_require_grad():
    hidden, weight, _, labels = make()
    w_frozen = weight.detach()
    logp, _ = selective_log_softmax(hidden, w_frozen, labels, chunk_size=8)
    (g_h,) = torch.autograd.grad(logp.sum(), (hidden,))
    ref, _ = naive_log_softmax(hidden, w_frozen, labels)
    torch.testing.assert_close(g_h, torch.autograd.grad(ref.sum(), (hidden,))[0])

    h_frozen = hidden.detach()
    logp, _ = selective_log_softmax(h_frozen, weight, labels, chunk_size=8)
    (g_w,) = torch.autograd.grad(logp.sum(), (weight,))
    ref, _ = naive_log_softmax(h_frozen, weight, labels)
    torch.testing.assert_close(g_w, torch.autograd.grad(ref.sum(), (weight,))[0])

    with torch.no_grad():
        logp, ent = selective_log_softmax(hidden, weight, labels, with_entropy=True)
    assert not logp.requires_grad and ent is not None


def test_bf16_inputs_compute_in_float32():
    hidden, weight, bias, labels = make(dtype=torch.float32)
    hb, wb = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    logp, ent = selective_log_softmax(hb, wb, labels, chunk_size=8, with_entropy=True)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    ref_logp, ref_ent = written_out(hb.float(), wb.float(), labels)
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-4, rtol=1e-4)
    logp.sum().backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    ref_h = torch.autograd.grad(naive_log_softmax(hb.float(), wb.float(), labels)[0].sum(), hb)[0]
    torch.testing.assert_close(hb.grad.float(), ref_h.float(), atol=2e-2, rtol=2e-2)


def test_argmax_matches_full_logits():
    hidden, weight, bias, labels = make(n=40)
    want = (hidden @ weight.T + bias).argmax(-1)
    assert torch.equal(argmax_tokens(hidden, weight, bias=bias, chunk_size=7), want)
    _, _, am = selective_log_softmax_ext(hidden, weight, labels, bias=bias, chunk_size=6, with_argmax=True)
    assert torch.equal(am, want)


def test_rejects_ignore_index_labels():
    hidden, weight, _, labels = make()
    labels[3] = -100
    with pytest.raises(ValueError, match=r"labels must lie in \[0, V=50\)"):
        selective_log_softmax(hidden, weight, labels)


# ---------------------------------------------------------------- token_logps on a tiny Llama

def tiny_llama(tie=False, seed=0, vocab=97):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def shifted_full_logps(model, ids, **kw):
    """Reference: log_softmax of the model's full logits, shifted to align with input_ids (t=0 -> 0)."""
    logits = model(input_ids=ids, use_cache=False, **kw).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(torch.softmax(logits[:, :-1], -1) * torch.log_softmax(logits[:, :-1], -1)).sum(-1)
    zero = lp.new_zeros(ids.shape[0], 1)
    return torch.cat([zero, lp], 1), torch.cat([zero, ent], 1), logits


def test_hidden_is_post_norm_and_head_runs_on_last_position_only():
    model = tiny_llama().eval()
    ids = torch.randint(0, 97, (2, 9))
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    out = token_logps(model, ids, return_hidden=True)
    handle.remove()
    assert seen == [1]  # the full [B, L, V] logits were never computed
    _, _, logits = shifted_full_logps(model, ids)
    torch.testing.assert_close(model.lm_head(out.hidden), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_token_logps_with_padding_matches_full_logits_and_gradients(tie):
    model = tiny_llama(tie=tie)
    ids = torch.randint(0, 97, (3, 11))
    attn = torch.ones_like(ids)
    attn[1, :3] = 0  # left padding
    attn[2, 8:] = 0  # right padding
    out = token_logps(model, ids, attn, with_entropy=True, chunk_size=5)
    ref_lp, ref_ent, _ = shifted_full_logps(model, ids, attention_mask=attn)
    valid = torch.zeros_like(attn, dtype=torch.bool)
    valid[:, 1:] = attn[:, 1:].bool() & attn[:, :-1].bool()
    assert torch.equal(out.mask, valid)
    torch.testing.assert_close(out.logps[valid], ref_lp[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy[valid], ref_ent[valid], atol=1e-5, rtol=1e-5)
    assert (out.logps[~valid] == 0).all() and (out.entropy[~valid] == 0).all()

    w = torch.randn(ids.shape)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad((out.logps * w).sum() + out.entropy[valid].sum(), params)
    want = torch.autograd.grad((ref_lp * w * valid).sum() + ref_ent[valid].sum(), params)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


def test_token_logps_padding_free_matches_separate_sequences():
    model = tiny_llama().eval()
    lens = [4, 6, 3]
    ids = torch.randint(0, 97, (1, sum(lens)))
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    out = token_logps(model, ids, position_ids=pos)
    # an all-ones attention mask must not turn off the per-sequence attention
    out_am = token_logps(model, ids, torch.ones_like(ids), position_ids=pos)
    torch.testing.assert_close(out_am.logps, out.logps)
    # against the packed model's own full logits
    ref_packed, _, _ = shifted_full_logps(model, ids, position_ids=pos)
    starts = torch.tensor([0, 4, 10])
    keep = torch.ones(sum(lens), dtype=torch.bool)
    keep[starts] = False
    torch.testing.assert_close(out.logps[0, keep], ref_packed[0, keep], atol=1e-5, rtol=1e-5)
    assert (out.logps[0, starts] == 0).all()
    # and against running each sequence alone (no cross-sequence attention)
    pieces, s = [], 0
    for n in lens:
        pieces.append(shifted_full_logps(model, ids[:, s:s + n])[0])
        s += n
    torch.testing.assert_close(out.logps, torch.cat(pieces, 1), atol=1e-5, rtol=1e-5)


def test_token_logps_mask_temperature_and_argmax():
    model = tiny_llama().eval()
    ids = torch.randint(0, 97, (2, 8))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 0] = True  # t=0 has no prediction: dropped
    mask[:, 5:] = True
    out = token_logps(model, ids, mask=mask, temperature=0.5, with_argmax=True)
    logits = model(input_ids=ids).logits / 0.5
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert not out.mask[:, 0].any() and out.mask[:, 5:].all() and not out.mask[:, 1:5].any()
    torch.testing.assert_close(out.logps[:, 5:], ref[:, 4:], atol=1e-5, rtol=1e-5)
    assert (out.logps[:, :5] == 0).all()
    assert torch.equal(out.argmax[:, 5:], logits[:, 4:-1].argmax(-1))
    assert (out.argmax[:, :5] == -1).all()


def test_token_logps_through_peft_and_wrappers():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))

    class Wrapper(torch.nn.Module):  # stands in for DDP: `.module`, forward delegates
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    wrapped = Wrapper(model)
    assert unwrap_model(wrapped) is model.base_model.model
    ids = torch.randint(0, 97, (2, 7))
    out = token_logps(wrapped, ids)
    ref, _, _ = shifted_full_logps(model, ids)
    torch.testing.assert_close(out.logps, ref, atol=1e-5, rtol=1e-5)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    got = torch.autograd.grad(out.logps.sum(), lora)
    want = torch.autograd.grad(ref.sum(), lora)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)
    with model.disable_adapter():  # the reference policy under PEFT
        base = token_logps(wrapped, ids).logps
    assert not torch.allclose(base, out.logps)


def test_gradient_checkpointing_and_empty_mask():
    model = tiny_llama()
    model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(0, 97, (2, 8))
    params = list(model.parameters())
    got = torch.autograd.grad(token_logps(model, ids).logps.sum(), params)
    want = torch.autograd.grad(shifted_full_logps(model, ids)[0].sum(), params)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)
    empty = token_logps(model, ids, mask=torch.zeros_like(ids))
    assert (empty.logps == 0).all() and not empty.mask.any()
    empty.logps.sum().backward()  # no rows: still a valid graph


def test_output_head_tied_and_bias():
    tied = tiny_llama(tie=True)
    weight, bias = output_head(tied)
    assert weight is tied.get_input_embeddings().weight and bias is None


# ---------------------------------------------------------------- memory

def test_chunked_peak_memory_is_far_below_full_logits_smoke():
    _check_memory(1024, 128)


@pytest.mark.slow
def test_chunked_peak_memory_is_far_below_full_logits_large():
    _check_memory(4096, 256)


def _check_memory(n, chunk):
    """Forward + backward with V=65536, H=64: peak RSS growth of the chunked op vs the full-logits path."""
    setup = f"""
        from posttrain.ops.logprobs import naive_log_softmax, selective_log_softmax
        n, chunk, h, v = {n}, {chunk}, 64, 65536
        hidden = torch.randn(n, h, requires_grad=True)
        weight = (torch.randn(v, h) * 0.05).requires_grad_()
        labels = torch.randint(0, v, (n,))

        def run(fn):
            weight.grad = None
            fn(hidden, weight, labels)[0].sum().backward()
            return float(weight.grad.abs().sum())
    """
    res = peak_kib(setup, {
        "chunked": "run(lambda h, w, y: selective_log_softmax(h, w, y, chunk_size=chunk, keep_logits=False))",
        "kept": "run(lambda h, w, y: selective_log_softmax(h, w, y, chunk_size=chunk, keep_logits=True))",
        "naive": "run(naive_log_softmax)",
    })
    chunked, kept, naive = res["chunked"], res["kept"], res["naive"]
    assert naive["value"] == pytest.approx(chunked["value"], rel=1e-3)
    assert naive["value"] == pytest.approx(kept["value"], rel=1e-3)
    # full logits: n x 65536 float32 = n / 4 MiB per [N, V] tensor, and the naive path holds about three
    assert naive["peak_kib"] > 2 * (n // 4) * 1024
    assert chunked["peak_kib"] < naive["peak_kib"] / 4, (chunked, naive)
    # kept logits: one [N, V] buffer, turned into the gradient in place
    assert kept["peak_kib"] < naive["peak_kib"] / 2, (kept, naive)
