"""posttrain.losses.sft: NLL and DFT against written-out computations."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses import sft_loss, token_accuracy

# two rows, aligned with input_ids: t=0 never counts; row 1 has 2 masked tokens, row 0 has 3
LOGPS = [[0.0, -0.5, -1.0, -2.0, -0.1], [0.0, -3.0, -0.2, -9.0, -9.0]]
MASK = [[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]]


def inputs():
    return torch.tensor(LOGPS, requires_grad=True), torch.tensor(MASK)


def test_token_mean_nll():
    logps, mask = inputs()
    loss, metrics = sft_loss(logps, mask)
    want = (0.5 + 1.0 + 2.0 + 3.0 + 0.2) / 5
    assert loss.item() == pytest.approx(want)
    assert metrics["nll"].item() == pytest.approx(want)
    assert metrics["num_tokens"].item() == 5
    probs = [math.exp(-x) for x in (0.5, 1.0, 2.0, 3.0, 0.2)]
    assert metrics["mean_token_prob"].item() == pytest.approx(sum(probs) / 5)
    loss.backward()
    want_grad = torch.tensor(MASK, dtype=torch.float32) * (-1 / 5)
    torch.testing.assert_close(logps.grad, want_grad)


def test_sequence_mean_nll_and_num_items():
    logps, mask = inputs()
    loss, _ = sft_loss(logps, mask, normalize="sequence")
    assert loss.item() == pytest.approx(((0.5 + 1.0 + 2.0) / 3 + (3.0 + 0.2) / 2) / 2)
    loss, _ = sft_loss(logps, mask, num_items=10)  # global token count under gradient accumulation
    assert loss.item() == pytest.approx((0.5 + 1.0 + 2.0 + 3.0 + 0.2) / 10)


def test_sequence_mean_padding_free_with_seq_lens():
    logps = torch.tensor([LOGPS[0] + LOGPS[1] + [0.0, 0.0]])  # packed row + 2 padding positions
    mask = torch.tensor([MASK[0] + MASK[1] + [0, 0]])
    loss, _ = sft_loss(logps, mask, normalize="sequence", seq_lens=[5, 5])
    assert loss.item() == pytest.approx(((0.5 + 1.0 + 2.0) / 3 + (3.0 + 0.2) / 2) / 2)
    with pytest.raises(ValueError, match="padding-free row"):
        sft_loss(logps, mask, normalize="sequence", seq_lens=[5, 8])


def test_dft_weights_each_token_by_its_detached_probability():
    logps, mask = inputs()
    loss, metrics = sft_loss(logps, mask, dft=True)
    terms = [(x, math.exp(-x) * x) for x in (0.5, 1.0, 2.0, 3.0, 0.2)]
    assert loss.item() == pytest.approx(sum(t for _, t in terms) / 5)
    assert metrics["nll"].item() == pytest.approx((0.5 + 1.0 + 2.0 + 3.0 + 0.2) / 5)
    loss.backward()
    # gradient of -sg(p) * logp w.r.t. logp is -p / n_tokens (the probability is not differentiated)
    want = -torch.tensor(LOGPS).exp() * torch.tensor(MASK) / 5
    torch.testing.assert_close(logps.grad, want)


def test_empty_mask_gives_zero_loss_with_gradient_path():
    logps = torch.tensor(LOGPS, requires_grad=True)
    for normalize in ("tokens", "sequence"):
        loss, metrics = sft_loss(logps, torch.zeros(2, 5), normalize=normalize)
        assert loss.item() == 0.0 and loss.requires_grad and metrics["num_tokens"].item() == 0


def test_bad_arguments():
    logps, mask = inputs()
    with pytest.raises(ValueError, match="normalize must be one of"):
        sft_loss(logps, mask, normalize="batch")
    with pytest.raises(ValueError, match="same shape"):
        sft_loss(logps, mask[:, :3])


def test_token_accuracy():
    ids = torch.tensor([[5, 1, 2, 3], [5, 4, 4, 0]])
    argmax = torch.tensor([[-1, 1, 9, 3], [-1, 4, 7, 0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    assert token_accuracy(argmax, ids, mask).item() == pytest.approx(3 / 5)


def test_matches_transformers_built_in_causal_lm_loss():
    """sft_loss over token_logps equals the model's own shifted cross-entropy with -100 labels."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.ops import token_logps

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=53, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    ids = torch.randint(0, 53, (2, 10))
    mask = torch.zeros_like(ids)
    mask[0, 4:] = 1
    mask[1, 2:7] = 1
    out = token_logps(model, ids, mask=mask, with_argmax=True)
    loss, _ = sft_loss(out.logps, mask)
    labels = ids.masked_fill(mask == 0, -100)
    hf = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(loss, hf.loss, atol=1e-5, rtol=1e-5)
    want_acc = ((hf.logits[:, :-1].argmax(-1) == ids[:, 1:]) & mask[:, 1:].bool()).sum() / mask.sum()
    assert token_accuracy(out.argmax, ids, mask).item() == pytest.approx(want_acc.item())
