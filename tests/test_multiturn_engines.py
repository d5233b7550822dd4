"""Multi-turn tool rollouts on every engine: the rollout server (one turn per request, the loop and the tool
in this process), vLLM colocated, and the async GRPO worker, with a tiny model trained to call ``add``.

Each engine must produce the same token-exact two-turn rollout as the HF engine (greedy), with the sampler
log-probs of the generated tokens matching the HF engine's."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from posttrain import AsyncGRPOConfig, AsyncGRPOTrainer, GRPOConfig, GRPOTrainer
from posttrain.online.engine_factory import make_engine
from posttrain.online.engine_hf import HFEngine
from posttrain.online.engines import OnlineEngineArgs, SamplingParams
from posttrain.online.multiturn import Agent, AgentSpec

from _agent_helpers import MEMO_PROMPT, add, memorized_tool_model
from _online_helpers import _one_thread  # noqa: F401  (autouse)
from _server_helpers import start_server

SPEC = "hidden=256,layers=2,heads=4"  # head_dim 64 for vLLM's CPU attention
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=120)


@pytest.fixture(scope="module")
def memo():
    model, tok, parts = memorized_tool_model(SPEC, steps=40)
    return model, tok, parts


def _agent_rollout(engine, tok):
    agent = Agent(AgentSpec([add]), tok, num_generations=1, max_completion_length=120)
    return agent.rollout(None, engine, [{"prompt": MEMO_PROMPT}] * 2, GREEDY, [tok.convert_tokens_to_ids("<|im_end|>")])


def _check_matches_hf(engine, memo, atol):
    model, tok, parts = memo
    expected, _ = _agent_rollout(HFEngine(model, tok), tok)
    assert expected.completion_ids[0] == parts["turn1"] + parts["suffix"] + parts["turn2"]  # the model calls the tool
    got, metrics = _agent_rollout(engine, tok)
    assert got.completion_ids == expected.completion_ids and got.tool_mask == expected.tool_mask
    assert metrics["tools/call_frequency"] == 1.0 and metrics["tools/finished_ratio"] == 1.0
    for lp, ref, mask in zip(got.logprobs, expected.logprobs, got.tool_mask):
        on = torch.tensor(mask, dtype=torch.bool)
        assert torch.allclose(torch.tensor(lp)[on], torch.tensor(ref)[on], atol=atol)
        assert torch.all(torch.tensor(lp)[~on] == 0)


def _data():
    return Dataset.from_list([{"prompt": MEMO_PROMPT, "answer": "5"}] * 8)


def _answer_reward(completions, answer, **kwargs):
    return [1.0 if c[-1]["content"] == f"<answer>{a}</answer>" else 0.0 for c, a in zip(completions, answer)]


@pytest.mark.slow
def test_rollout_server_runs_one_turn_per_request(memo):
    model, tok, _ = memo
    server = start_server("--model", f"tiny:{SPEC}", "--backend", "hf")
    try:
        client = make_engine(OnlineEngineArgs(use_vllm=True, vllm_mode="server", vllm_server_url=server.url,
                                              vllm_server_timeout=120), model, tok)  # pushes our weights
        _check_matches_hf(client, memo, atol=1e-4)
        client.close()
    finally:
        server.stop()


@pytest.mark.vllm
def test_vllm_colocated_multiturn_matches_hf_and_trains(memo):
    model, tok, _ = memo
    engine = make_engine(OnlineEngineArgs(use_vllm=True, vllm_mode="colocate", vllm_kv_cache_gb=0.5), model, tok)
    try:
        _check_matches_hf(engine, memo, atol=1e-3)
        args = GRPOConfig(output_dir="/tmp/posttrain-test-mt-vllm", num_generations=2, per_device_train_batch_size=4,
                          max_completion_length=120, max_steps=1, report_to="none", save_strategy="no",
                          disable_tqdm=True, temperature=0.0, num_iterations=1)
        trainer = GRPOTrainer(model, _answer_reward, args, _data(), processing_class=tok, tools=[add], engine=engine)
        trainer.train()
        logged = trainer.state.log_history[0]
        assert logged["tools/call_frequency"] == 1.0 and logged["reward"] == 1.0
    finally:
        engine.close()


@pytest.mark.slow
def test_async_grpo_runs_the_tool_loop_against_its_worker(memo):
    model, tok, _ = memo
    args = AsyncGRPOConfig(output_dir="/tmp/posttrain-test-mt-async", num_generations=2, per_device_train_batch_size=4,
                           max_completion_length=120, max_steps=2, report_to="none", save_strategy="no",
                           disable_tqdm=True, temperature=0.0, learning_rate=1e-6)
    trainer = AsyncGRPOTrainer(model=model, reward_funcs=_answer_reward, args=args, train_dataset=_data(),
                               processing_class=tok, tools=[add])
    trainer.train()
    logged = [h for h in trainer.state.log_history if "tools/call_frequency" in h]
    assert logged and all(h["tools/call_frequency"] == 1.0 and h["reward"] == 1.0 for h in logged)
