"""Geometric-mixture sampling (Nash-MD) against a written-out mixture of two tiny models' logits."""

from __future__ import annotations

import pytest
import torch

from posttrain.models import build_tiny
from posttrain.online.engine_mixture import MixtureEngine
from posttrain.online.engines import SamplingParams

from _online_helpers import _one_thread  # noqa: F401  (autouse)


@torch.no_grad()
def _written_out(policy, ref, prompt, completion, m, temperature=1.0):
    """Per-token log-prob of ``completion`` under softmax(((1-m) log pi + m log ref) / T), from full forwards."""
    ids = torch.tensor([prompt + completion])
    lp = torch.log_softmax(policy(ids).logits[0].float(), -1)
    lr = torch.log_softmax(ref(ids).logits[0].float(), -1)
    mixed = torch.log_softmax(((1 - m) * lp + m * lr) / temperature, -1)
    out = []
    for t, tok in enumerate(completion):
        out.append((mixed[len(prompt) - 1 + t], tok))
    return out


@pytest.mark.parametrize("m", [0.3, 0.7])
def test_greedy_mixture_follows_the_written_out_mixture(m):
    policy, tok = build_tiny("nano", seed=0)
    ref, _ = build_tiny("nano", seed=1)
    engine = MixtureEngine(policy, tok, ref_model=ref, mixture_coef=m)
    prompts = ["What is 12 + 30?\n", "Hi", "What is 7 + 5?\n"]  # different lengths: left padding in one chunk
    rollout = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=6, stop_on_eos=False))
    for j, ids in enumerate(rollout.completion_ids):
        steps = _written_out(policy, ref, rollout.prompt_ids[j], ids, m)
        for t, (row, token) in enumerate(steps):
            assert token == int(row.argmax()), (j, t)
            assert rollout.logprobs[j][t] == pytest.approx(float(row[token]), abs=1e-4)
    # neither model alone decodes the same (the mixture is really mixed)
    alone = [MixtureEngine(policy, tok, ref_model=ref, mixture_coef=c).generate(
        prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=6, stop_on_eos=False)).completion_ids for c in (0, 1)]
    assert rollout.completion_ids != alone[0] or rollout.completion_ids != alone[1]


def test_sampled_mixture_log_probs_and_temperature():
    policy, tok = build_tiny("nano", seed=0)
    ref, _ = build_tiny("nano", seed=1)
    engine = MixtureEngine(policy, tok, ref_model=ref, mixture_coef=0.5)
    params = SamplingParams(n=3, temperature=0.8, max_new_tokens=5, seed=7, stop_on_eos=False)
    rollout = engine.generate(["What is 3 + 4?\n"], params)
    for j, ids in enumerate(rollout.completion_ids):
        for t, (row, token) in enumerate(_written_out(policy, ref, rollout.prompt_ids[j], ids, 0.5, 0.8)):
            assert rollout.logprobs[j][t] == pytest.approx(float(row[token]), abs=1e-4)
    again = engine.generate(["What is 3 + 4?\n"], params)
    assert again.completion_ids == rollout.completion_ids  # seeded


def test_mixture_endpoints_and_peft_reference():
    from peft import LoraConfig, get_peft_model

    base, tok = build_tiny("nano", seed=0)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=5, stop_on_eos=False)
    plain = MixtureEngine(base, tok, ref_model=build_tiny("nano", seed=0)[0], mixture_coef=1.0).generate(["Hi"], greedy)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    engine = MixtureEngine(peft, tok, mixture_coef=1.0)  # reference: the base with adapters disabled
    assert engine.generate(["Hi"], greedy).completion_ids == plain.completion_ids
    engine.mixture_coef = 0.5
    mixed = engine.generate(["Hi"], greedy)
    with torch.no_grad():
        ids = torch.tensor([mixed.prompt_ids[0] + mixed.completion_ids[0]])
        lp = torch.log_softmax(peft(ids).logits[0].float(), -1)
        with peft.disable_adapter():
            lr = torch.log_softmax(peft(ids).logits[0].float(), -1)
    n = len(mixed.prompt_ids[0])
    for t, token in enumerate(mixed.completion_ids[0]):
        row = torch.log_softmax(0.5 * lp[n - 1 + t] + 0.5 * lr[n - 1 + t], -1)
        assert token == int(row.argmax()) and mixed.logprobs[0][t] == pytest.approx(float(row[token]), abs=1e-4)
    with pytest.raises(ValueError, match="mixture_coef"):
        engine.mixture_coef = 1.5
    with pytest.raises(ValueError, match="ref_model"):
        MixtureEngine(build_tiny("nano")[0], tok)
