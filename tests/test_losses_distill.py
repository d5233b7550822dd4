"""posttrain.losses.distill (generalized JSD, MiniLLM) against written-out computations, and the chunked
completion path (teacher and student both from hidden states) against full logits."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.losses.distill import (distillation_loss, generalized_jsd_loss, minillm_advantages, minillm_loss,
                                      minillm_returns)
from posttrain.online.logprobs import completion_divergence, completion_logps

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]


def written_out_jsd(zs: torch.Tensor, zt: torch.Tensor, beta: float, temperature: float) -> torch.Tensor:
    """Per-position divergence with plain softmax probabilities and explicit sums (no log-space tricks)."""
    q = torch.softmax(zs.double() / temperature, -1)
    p = torch.softmax(zt.double() / temperature, -1)
    if beta == 0.0:
        return (p * torch.log(p / q)).sum(-1)
    if beta == 1.0:
        return (q * torch.log(q / p)).sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * torch.log(p / m)).sum(-1) + (1 - beta) * (q * torch.log(q / m)).sum(-1)


def _logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_generalized_jsd_matches_written_out(beta, temperature):
    zs, zt = _logits(3, 5, 17), _logits(3, 5, 17, seed=1)
    got = generalized_jsd_loss(zs, zt, beta=beta, temperature=temperature, reduction="none")
    want = written_out_jsd(zs, zt, beta, temperature)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert (want > 0).all()


def test_masked_positions_are_left_out_of_every_reduction():
    zs, zt = _logits(2, 6, 11), _logits(2, 6, 11, seed=1)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 1, 2, 3, -100, -100]])
    want = written_out_jsd(zs, zt, 0.5, 1.0)
    keep = labels != -100
    torch.testing.assert_close(generalized_jsd_loss(zs, zt, labels, reduction="sum").double(), want[keep].sum(),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(generalized_jsd_loss(zs, zt, labels).double(), want[keep].mean(), atol=1e-5, rtol=1e-5)
    none = generalized_jsd_loss(zs, zt, labels, reduction="none")
    assert (none[~keep] == 0).all()


def test_vocab_padding_compares_the_shared_ids_only():
    """A teacher whose embedding is padded to 24 rows (the tokenizer has 17 ids): the padding rows are dropped
    and both distributions are normalized over the 17 shared ids."""
    zs, zt = _logits(2, 4, 17), _logits(2, 4, 24, seed=1)
    got = generalized_jsd_loss(zs, zt, beta=0.5, reduction="none")
    torch.testing.assert_close(got.double(), written_out_jsd(zs, zt[..., :17], 0.5, 1.0), atol=1e-5, rtol=1e-5)
    # the same whichever side is the larger
    got_rev = generalized_jsd_loss(zt, zs, beta=0.5, reduction="none")
    torch.testing.assert_close(got_rev.double(), written_out_jsd(zt[..., :17], zs, 0.5, 1.0), atol=1e-5, rtol=1e-5)


def test_bad_beta_and_reduction_are_errors():
    zs = _logits(1, 2, 5)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(zs, zs, beta=1.5)
    with pytest.raises(ValueError, match="reduction"):
        generalized_jsd_loss(zs, zs, reduction="avg")


def test_distillation_loss_is_the_step_token_mean():
    div = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    loss, metrics = distillation_loss(div, mask)
    assert loss.item() == pytest.approx((1 + 2 + 4) / 3)
    loss10, _ = distillation_loss(div, mask, num_items_in_batch=10)  # a step with 10 loss tokens in all
    assert loss10.item() == pytest.approx(7 / 10)
    assert metrics["divergence"].item() == pytest.approx(7 / 3)


# --------------------------------------------------------------------------------------------- MiniLLM
def brute_returns(r, mask, gamma, single_step, norm):
    out = torch.zeros_like(r, dtype=torch.float64)
    for b in range(r.shape[0]):
        n = int(mask[b].sum())
        for t in range(n):
            span = range(t + 1, n) if single_step else range(t, n)
            num = sum(gamma ** (u - t) * float(r[b, u]) for u in span)
            den = sum(gamma ** (u - t) for u in span)  # python: 0.0 ** 0 == 1.0
            out[b, t] = (num / den if den > 0 else 0.0) if norm else num
    return out


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("single_step", [True, False])
@pytest.mark.parametrize("norm", [True, False])
def test_minillm_returns_match_loops(gamma, single_step, norm):
    r = _logits(3, 6)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5], dtype=torch.bool)
    got = minillm_returns(r, mask, gamma=gamma, single_step=single_step, length_normalization=norm)
    torch.testing.assert_close(got.double(), brute_returns(r, mask, gamma, single_step, norm), atol=1e-9, rtol=1e-9)


def test_minillm_advantages_subtract_the_group_mean_return_and_add_extra_rewards():
    teacher, student = _logits(4, 5).float(), _logits(4, 5, seed=1).float()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0])
    adv, metrics = minillm_advantages(teacher, student, mask, 2, gamma=1.0, single_step=False, rewards=rewards,
                                      scale_rewards="none")
    ret = brute_returns((teacher - student).double(), mask, 1.0, False, True)
    want = torch.zeros(4, 5, dtype=torch.float64)
    for g in range(2):
        rows = [2 * g, 2 * g + 1]
        baseline = sum(float(ret[b][mask[b]].sum()) for b in rows) / sum(int(mask[b].sum()) for b in rows)
        seq_mean = sum(float(rewards[b]) for b in rows) / 2
        for b in rows:
            want[b] = (ret[b] - baseline + (float(rewards[b]) - seq_mean)) * mask[b]
    torch.testing.assert_close(adv.double(), want, atol=1e-5, rtol=1e-5)
    r = (teacher - student)[mask]
    assert metrics["rkl_reward"].item() == pytest.approx(float(r.mean()), abs=1e-6)


def test_minillm_rkl_advantage_false_leaves_only_the_extra_rewards_advantage():
    """TRL's rkl_advantage=False: the per-token advantage is the extra rewards' group-relative advantage alone
    (the same on every completion token), with no reverse-KL return; without rewards it is zero."""
    teacher, student = _logits(4, 5).float(), _logits(4, 5, seed=1).float()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0])
    adv, metrics = minillm_advantages(teacher, student, mask, 2, rewards=rewards, scale_rewards="none",
                                      rkl_advantage=False)
    want = torch.tensor([0.5, -0.5, -1.0, 1.0])[:, None] * mask  # reward minus its group's mean
    torch.testing.assert_close(adv, want)
    with_rkl, _ = minillm_advantages(teacher, student, mask, 2, gamma=1.0, single_step=False, rewards=rewards,
                                     scale_rewards="none")
    without, _ = minillm_advantages(teacher, student, mask, 2, gamma=1.0, single_step=False, rewards=rewards,
                                    scale_rewards="none", rkl_advantage=False)
    torch.testing.assert_close(without, adv)  # gamma / single_step shape only the reverse-KL part
    assert not torch.allclose(with_rkl, adv)  # the switch changes the advantage by the reverse-KL part
    assert metrics["rkl_reward"].item() == pytest.approx(float((teacher - student)[mask].mean()), abs=1e-6)
    alone, _ = minillm_advantages(teacher, student, mask, 2, rkl_advantage=False)
    assert torch.count_nonzero(alone) == 0


def test_minillm_loss_gradient_is_minus_advantage_plus_single_step_gradient():
    logps = _logits(2, 4).float().requires_grad_()
    adv = _logits(2, 4, seed=2).float()
    kl = _logits(2, 4, seed=3).float().abs().requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    loss, metrics = minillm_loss(logps, adv, mask, single_step_kl=kl)
    n = mask.sum()
    assert loss.item() == pytest.approx(float(((-adv + kl.detach()) * mask).sum() / n), abs=1e-5)
    g_logps, g_kl = torch.autograd.grad(loss, (logps, kl))
    torch.testing.assert_close(g_logps, -adv * mask / n)
    torch.testing.assert_close(g_kl, mask.float() / n)
    assert metrics["clip_ratio/region_mean"].item() == 0.0


# ------------------------------------------------------------------- the chunked completion path vs logits
def _lm(vocab, hidden, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).double()


def _full_logits(model, prompts, completions):
    """The completion tokens' predicting logits, row by row, from the model's own full-logits forward."""
    out = []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c])
        logits = model(input_ids=ids).logits[0]
        out.append(logits[len(p) - 1: len(p) + len(c) - 1])
    return out


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("padding_free", [True, False])
def test_completion_divergence_matches_full_logits_with_padded_teacher_vocab(beta, padding_free):
    """Student vocabulary 40, teacher embedding padded to 48 and twice as wide: the chunked divergence over the
    shared 40 ids equals the written-out one from both models' full logits, and so do its gradients."""
    student, teacher = _lm(40, 16, 0), _lm(48, 32, 1)
    prompts, completions = [[1, 2, 3], [4, 5]], [[6, 7, 8, 9], [10, 11]]
    values, mask = completion_divergence(student, teacher, prompts, completions, kind="jsd", beta=beta,
                                         temperature=1.5, padding_free=padding_free, vocab_size=40)
    assert values.shape == (2, 4) and mask.tolist() == [[True] * 4, [True, True, False, False]]
    zs, zt = _full_logits(student, prompts, completions), _full_logits(teacher, prompts, completions)
    want = [written_out_jsd(a, b[:, :40], beta, 1.5) for a, b in zip(zs, zt)]
    for b in range(2):
        torch.testing.assert_close(values[b, : len(completions[b])].double(), want[b], atol=1e-8, rtol=1e-6)
    w = student.lm_head.weight
    g_got = torch.autograd.grad(values[mask].sum(), w)[0]
    g_want = torch.autograd.grad(sum(x.sum() for x in want), w)[0]
    torch.testing.assert_close(g_got.double(), g_want, atol=1e-7, rtol=1e-5)


def test_completion_logps_over_the_shared_vocabulary():
    teacher = _lm(48, 32, 1)
    prompts, completions = [[1, 2, 3]], [[6, 7, 8]]
    got = completion_logps(teacher, prompts, completions, vocab_size=40).logps[0]
    z = _full_logits(teacher, prompts, completions)[0][:, :40]
    want = torch.log_softmax(z, -1).gather(1, torch.tensor([[6], [7], [8]]))[:, 0]
    torch.testing.assert_close(got.double(), want, atol=1e-8, rtol=1e-6)
    assert not math.isclose(float(got.sum()), float(completion_logps(teacher, prompts, completions).logps.sum()))
