"""posttrain.ops.divergences: chunked forward KL, reverse KL and generalized JSD vs full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.ops import chunked_divergence, token_divergence

from _memory import peak_kib


def written_out(zs, zt, kind, beta):
    """Divergence per row from full logits, via torch's kl_div (independent of the op's code)."""
    ls, lt = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
    kl = lambda a, b: F.kl_div(b, a, reduction="none", log_target=True).sum(-1)  # noqa: E731  KL(a || b)
    if kind == "forward_kl":
        return kl(lt, ls)
    if kind == "reverse_kl":
        return kl(ls, lt)
    lm = torch.log(beta * lt.exp() + (1 - beta) * ls.exp())
    return beta * kl(lt, lm) + (1 - beta) * kl(ls, lm)


def make(n=23, hs=6, ht=9, v=40, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    t = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return t(n, hs), t(v, hs), t(v), t(n, ht), t(v, ht), t(v)


CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9)]


@pytest.mark.parametrize("kind,beta", CASES)
@pytest.mark.parametrize("chunk_size", [4, 64])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_values_and_all_gradients_match_full_logits(kind, beta, chunk_size, temperature):
    hs, ws, bs, ht, wt, bt = inputs = make()
    got = chunked_divergence(hs, ws, ht, wt, kind=kind, beta=beta, student_bias=bs, teacher_bias=bt,
                             temperature=temperature, chunk_size=chunk_size)
    want = written_out((hs @ ws.T + bs) / temperature, (ht @ wt.T + bt) / temperature, kind, beta)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    assert (got >= -1e-12).all()
    w = torch.randn(23, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for g1, g2 in zip(torch.autograd.grad((got * w).sum(), inputs), torch.autograd.grad((want * w).sum(), inputs)):
        torch.testing.assert_close(g1, g2, atol=1e-9, rtol=1e-9)


def test_jsd_ends_are_forward_and_reverse_kl():
    hs, ws, _, ht, wt, _ = make()
    fwd = chunked_divergence(hs, ws, ht, wt, kind="forward_kl")
    rev = chunked_divergence(hs, ws, ht, wt, kind="reverse_kl")
    torch.testing.assert_close(chunked_divergence(hs, ws, ht, wt, kind="jsd", beta=0.0), fwd)
    torch.testing.assert_close(chunked_divergence(hs, ws, ht, wt, kind="jsd", beta=1.0), rev)
    # and the limits: JSD_beta / beta -> KL(p || q) as beta -> 0, JSD_beta / (1 - beta) -> KL(q || p) as beta -> 1
    hs, ht = hs * 0.3, ht * 0.3  # milder distributions, so the limit is reached at a moderate beta
    fwd = chunked_divergence(hs, ws, ht, wt, kind="forward_kl")
    rev = chunked_divergence(hs, ws, ht, wt, kind="reverse_kl")
    near0 = chunked_divergence(hs, ws, ht, wt, kind="jsd", beta=1e-7) / 1e-7
    near1 = chunked_divergence(hs, ws, ht, wt, kind="jsd", beta=1 - 1e-7) / 1e-7
    torch.testing.assert_close(near0, fwd, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(near1, rev, atol=1e-4, rtol=1e-4)


def test_float32_student_only_and_gradcheck():
    hs, ws, _, ht, wt, _ = make()
    hs32 = hs.detach().float().requires_grad_()
    out = chunked_divergence(hs32, ws.detach().float(), ht.detach().float(), wt.detach().float(), kind="jsd",
                             chunk_size=5)
    assert out.dtype == torch.float32
    (g,) = torch.autograd.grad(out.sum(), hs32)
    want = written_out(hs32 @ ws.detach().float().T, (ht @ wt.T).detach().float(), "jsd", 0.5)
    torch.testing.assert_close(g, torch.autograd.grad(want.sum(), hs32)[0], atol=1e-5, rtol=1e-4)
    small = [x[:5].detach().requires_grad_() if i in (0, 3) else x[:7].detach().requires_grad_()
             for i, x in enumerate((hs, ws, None, ht, wt)) if x is not None]
    f = lambda a, b, c, d: chunked_divergence(a, b, c, d, kind="jsd", beta=0.3, chunk_size=2)  # noqa: E731
    assert torch.autograd.gradcheck(f, tuple(small))


def test_errors_name_the_problem():
    hs, ws, _, ht, wt, _ = make()
    with pytest.raises(ValueError, match="vocabularies differ"):
        chunked_divergence(hs, ws, ht, wt[:30])
    with pytest.raises(ValueError, match="beta must be in"):
        chunked_divergence(hs, ws, ht, wt, kind="jsd", beta=1.5)
    with pytest.raises(ValueError, match="divergence must be one of"):
        chunked_divergence(hs, ws, ht, wt, kind="tvd")


def tiny(hidden, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=61, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def test_token_divergence_between_two_models():
    student, teacher = tiny(16, 0), tiny(32, 1)
    ids = torch.randint(0, 61, (2, 9))
    attn = torch.ones_like(ids)
    attn[1, 6:] = 0
    got = token_divergence(student, teacher, ids, attn, kind="jsd", beta=0.4, temperature=1.5, chunk_size=3)
    zs = student(input_ids=ids, attention_mask=attn).logits / 1.5
    with torch.no_grad():
        zt = teacher(input_ids=ids, attention_mask=attn).logits / 1.5
    want = torch.zeros(2, 9)
    want[:, 1:] = written_out(zs[:, :-1], zt[:, :-1], "jsd", 0.4)
    valid = torch.zeros_like(attn, dtype=torch.bool)
    valid[:, 1:] = attn[:, 1:].bool() & attn[:, :-1].bool()
    want = want * valid
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    params = list(student.parameters())
    for g1, g2 in zip(torch.autograd.grad(got.sum(), params), torch.autograd.grad(want.sum(), params)):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in teacher.parameters())


def test_chunked_divergence_peak_memory_is_far_below_full_logits():
    setup = """
        from posttrain.ops.divergences import chunked_divergence, naive_divergence
        n, h, v = 256, 64, 65536
        hs = torch.randn(n, h, requires_grad=True)
        ws = (torch.randn(v, h) * 0.05).requires_grad_()
        ht, wt = torch.randn(n, h), torch.randn(v, h) * 0.05

        def run(fn, **kw):
            ws.grad = None
            fn(hs, ws, ht, wt, kind="jsd", **kw).sum().backward()
            return float(ws.grad.abs().sum())
    """
    res = peak_kib(setup, {"chunked": "run(chunked_divergence, chunk_size=32)", "naive": "run(naive_divergence)"})
    chunked, naive = res["chunked"], res["naive"]
    assert naive["value"] == pytest.approx(chunked["value"], rel=1e-3)
    assert naive["peak_kib"] > 4 * 64 * 1024  # several [256, 65536] float32 tensors (64 MiB each)
    assert chunked["peak_kib"] < naive["peak_kib"] / 4, (chunked, naive)
