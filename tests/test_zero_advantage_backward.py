"""Completions with advantage 0 run without gradients (`skip_zero_advantage_backward`): same loss, same update."""

from __future__ import annotations

import pytest
import torch

from posttrain.models import build_tiny
from posttrain.online.logprobs import completion_logps, partial_grad_completion_logps
from posttrain.tasks import ArithmeticTask
from posttrain.trainers.grpo import GRPOConfig, GRPOTrainer
from posttrain.trainers.rloo import RLOOConfig, RLOOTrainer

from _online_helpers import _one_thread, history  # noqa: F401  (_one_thread: autouse)


def _sequences(seed: int = 0, n: int = 5) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, 200, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    completions = [torch.randint(5, 200, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(n)]
    return prompts, completions


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True), params)]


def test_partial_grad_logps_equal_the_full_forward_in_values_and_gradient():
    model, _ = build_tiny("nano")
    prompts, completions = _sequences()
    needs = torch.tensor([True, False, False, True, False])
    full = completion_logps(model, prompts, completions, with_entropy=True)
    part = partial_grad_completion_logps(model, prompts, completions, needs, with_entropy=True)
    assert torch.equal(part.mask, full.mask)
    torch.testing.assert_close(part.logps, full.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part.entropy, full.entropy, atol=1e-5, rtol=1e-5)
    weights = torch.tensor([0.7, 0.0, 0.0, -1.3, 0.0])[:, None] * full.mask
    for got, want in zip(_grads(model, (part.logps * weights).sum()), _grads(model, (full.logps * weights).sum())):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    # the rows run without gradients reach no parameter: nothing was recorded for their backward
    assert all(g.abs().max() == 0 for g in _grads(model, part.logps[~needs].sum()))
    assert any(g.abs().max() > 0 for g in _grads(model, part.logps[needs].sum()))


def test_no_row_needing_gradient_still_gives_a_loss_that_reaches_the_model():
    model, _ = build_tiny("nano")
    prompts, completions = _sequences(seed=1, n=3)
    part = partial_grad_completion_logps(model, prompts, completions, torch.zeros(3, dtype=torch.bool))
    assert part.logps.requires_grad  # the first completion keeps its gradient (DDP needs one from every process)
    torch.testing.assert_close(part.logps, completion_logps(model, prompts, completions).logps, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs_grad has 2 entries for 3 completions"):
        partial_grad_completion_logps(model, prompts, completions, torch.ones(2, dtype=torch.bool))


def _first_group_varies(prompts, completions, **kw):
    """Rewards that vary within the first group of 4 completions and are constant in the second."""
    return [len(c) / 10 if i < 4 else 0.5 for i, c in enumerate(completions)]


def _train(trainer_class, config_class, skip: bool, **kw):
    model, tok = build_tiny("nano")
    fields = dict(output_dir="/tmp/posttrain-test-zero-adv", num_generations=4, per_device_train_batch_size=8,
                  max_completion_length=6, max_steps=2, logging_steps=1, report_to="none", learning_rate=1e-3,
                  log_completions=False, save_strategy="no", disable_tqdm=True, skip_zero_advantage_backward=skip)
    args = config_class(**{**fields, **kw})
    trainer = trainer_class(model, _first_group_varies, args, train_dataset=ArithmeticTask(digits=2).prompt_only(32),
                            processing_class=tok)
    trainer.train()
    return trainer


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_skipping_the_backward_of_zero_advantage_completions_leaves_training_unchanged(method):
    classes = {"grpo": (GRPOTrainer, GRPOConfig, {}), "rloo": (RLOOTrainer, RLOOConfig, {"beta": 0.0})}[method]
    skipped, computed = (_train(*classes[:2], skip, **classes[2]) for skip in (True, False))
    assert skipped.counts["completions_without_backward"] == 2 * 4  # the constant group, at each of 2 steps
    assert computed.counts["completions_without_backward"] == 0
    for key in ("loss", "entropy", "reward", "frac_reward_zero_std"):
        torch.testing.assert_close(torch.tensor(history(skipped, key)), torch.tensor(history(computed, key)),
                                   atol=1e-5, rtol=1e-4, msg=key)
    assert history(skipped, "frac_reward_zero_std") == [0.5, 0.5]
    for (name, a), b in zip(skipped.model.named_parameters(), computed.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(skipped.model.parameters(), build_tiny("nano")[0].parameters()))


def test_a_kl_term_in_the_loss_keeps_every_completion_in_the_backward():
    trainer = _train(GRPOTrainer, GRPOConfig, True, beta=0.1, max_steps=1)
    assert not trainer.zero_advantage_means_zero_gradient
    assert trainer.counts["completions_without_backward"] == 0
    rloo = _train(RLOOTrainer, RLOOConfig, True, beta=0.1, kl_in_reward=False, max_steps=1)
    assert rloo.counts["completions_without_backward"] == 0
