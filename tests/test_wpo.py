"""WPO (`DPOConfig(use_weighting=True)`): the per-token normalizer against the full softmax, the weights against a
written-out loop, and the trainer's loss against a full-logits computation of the same batch."""

from __future__ import annotations

import math

import torch
from datasets import Dataset

from posttrain import DPOConfig, DPOTrainer
from posttrain.losses.dpo import wpo_weights
from posttrain.models import build_tiny
from posttrain.ops.logprobs import log_sum_sq_probs


def test_log_sum_sq_probs_matches_the_full_softmax():
    gen = torch.Generator().manual_seed(0)
    hidden, weight, bias = torch.randn(37, 16, generator=gen), torch.randn(300, 16, generator=gen), torch.randn(300, generator=gen)
    for temperature in (1.0, 0.7):
        probs = torch.softmax((hidden @ weight.T + bias) / temperature, -1)
        expected = torch.log((probs ** 2).sum(-1))
        got = log_sum_sq_probs(hidden, weight, bias, temperature=temperature, chunk_size=8)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_wpo_weights_written_out():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, 0.0]])
    lss = torch.tensor([[-0.5, -1.0, -0.1], [-0.3, -2.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    expected = []
    for i in range(2):
        terms = [logps[i, t] - lss[i, t] for t in range(3) if mask[i, t]]
        expected.append(math.exp(sum(terms) / len(terms)))
    torch.testing.assert_close(wpo_weights(logps, lss, mask), torch.tensor(expected))


def test_dpo_loss_is_weighted_by_both_responses_wpo_weights(tmp_path):
    """At the first step the policy equals its reference, so every pair's sigmoid loss is log 2 and the batch loss
    is log 2 times the mean of w(chosen) w(rejected), each w computed here from the model's full logits."""
    model, tok = build_tiny("nano", seed=0)
    rows = [{"prompt": f"{a} + {b} =", "chosen": f" {a + b}", "rejected": f" {a + b + 1} or so"}
            for a, b in [(1, 2), (3, 4), (10, 5), (7, 7)]]
    config = DPOConfig(output_dir=str(tmp_path), use_weighting=True, per_device_train_batch_size=4, max_steps=1,
                       report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)

    def weight(prompt_ids, completion_ids):
        ids = torch.tensor([prompt_ids + completion_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        positions = range(len(prompt_ids) - 1, ids.shape[1] - 1)  # logits at t predict token t + 1
        terms = [logp[t, ids[0, t + 1]] - torch.logsumexp(2 * logp[t], -1) for t in positions]
        return math.exp(sum(float(x) for x in terms) / len(terms))

    data = trainer.train_dataset
    products = [weight(p, c) * weight(p, r) for p, c, r in zip(data["prompt_ids"], data["chosen_ids"],
                                                                   data["rejected_ids"])]
    assert abs(float(loss) - math.log(2) * sum(products) / len(products)) < 1e-4
