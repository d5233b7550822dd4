"""Multi-turn rollouts with tools and environments (posttrain.online.multiturn) and their trainer wiring."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from posttrain import GRPOConfig, GRPOTrainer
from posttrain.data.templates import trainer_tokenizer
from posttrain.models import build_tokenizer
from posttrain.online.engines import SamplingParams
from posttrain.online.multiturn import Agent, AgentSpec

from _agent_helpers import ScriptedEngine, add, call
from _online_helpers import _one_thread  # noqa: F401  (autouse)


@pytest.fixture(scope="module")
def tok():
    return trainer_tokenizer(build_tokenizer(), "chatml")[1]


def _prompt(text="What is 12 + 30?"):
    return [{"role": "user", "content": text}]


def _three_turns(turn, text):
    return [call("add", a=12, b=30), call("add", a=42, b=1), "<answer>43</answer>"][min(turn, 2)]


def test_three_turn_rollout_is_token_exact_with_masks_and_aligned_logprobs(tok):
    engine = ScriptedEngine(tok, _three_turns)
    agent = Agent(AgentSpec([add]), tok, num_generations=2, max_completion_length=400)
    rollout, metrics = agent.rollout(None, engine, [{"prompt": _prompt()}], SamplingParams(n=2, max_new_tokens=400),
                                     [tok.convert_tokens_to_ids("<|im_end|>")])
    assert len(rollout) == 2 and rollout.prompt_index == [0, 0]
    # two rollouts per turn, in order: rollout 0's turns are produced[0], [2], [4]
    g1, g2, g3 = engine.produced[0], engine.produced[2], engine.produced[4]
    s1 = agent.tool_suffix_ids([{"role": "tool", "name": "add", "content": "42"}])
    s2 = agent.tool_suffix_ids([{"role": "tool", "name": "add", "content": "43"}])
    ids, mask, lps = rollout.completion_ids[0], rollout.tool_mask[0], rollout.logprobs[0]
    # token-exact: the engine's tokens and the template's tool-result tokens, nothing re-tokenized
    assert ids == g1 + s1 + g2 + s2 + g3
    assert mask == [1] * len(g1) + [0] * len(s1) + [1] * len(g2) + [0] * len(s2) + [1] * len(g3)
    sampled = [-0.01 * (t + 1) for t in range(len(g1))] + [-0.01 * (t + 1) for t in range(len(g2))] + \
              [-0.01 * (t + 1) for t in range(len(g3))]
    assert [lp for lp, m in zip(lps, mask) if m] == pytest.approx(sampled)
    assert all(lp == 0.0 for lp, m in zip(lps, mask) if not m)
    # each turn's request is the previous request's tokens plus what came since: one growing sequence
    prompt = rollout.prompt_ids[0]
    assert engine.requests[1][0] == prompt + g1 + s1 and engine.requests[2][0] == prompt + g1 + s1 + g2 + s2
    # the masked spans are the template's tool turns carrying the results
    assert tok.decode(s1).startswith("\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n")
    # what reward functions see
    roles = [m["role"] for m in rollout.messages[0]]
    assert roles == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert rollout.messages[0][0]["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": 12, "b": 30}}
    assert rollout.messages[0][-1]["content"] == "<answer>43</answer>"
    assert rollout.truncated == [False, False]
    assert metrics["tools/call_frequency"] == 2 and metrics["tools/turns"] == 3
    assert metrics["tools/finished_ratio"] == 1.0 and metrics["tools/failure_frequency"] == 0.0
    assert metrics["tools/tool_tokens"] == len(s1) + len(s2)
    assert metrics["tools/completion_tokens"] == len(g1) + len(g2) + len(g3)


def test_tool_errors_and_iteration_limit(tok):
    def script(turn, text):
        return call("add", a=1) if turn == 0 else call("nope") + call("add", a=1, b=2)

    agent = Agent(AgentSpec([add]), tok, num_generations=1, max_completion_length=400, max_tool_calling_iterations=2)
    rollout, metrics = agent.rollout(None, ScriptedEngine(tok, script), [{"prompt": _prompt()}],
                                     SamplingParams(n=1, max_new_tokens=400), [tok.convert_tokens_to_ids("<|im_end|>")])
    messages = rollout.messages[0]
    assert [m["role"] for m in messages] == ["assistant", "tool", "assistant", "tool", "tool", "assistant"]
    assert "wrong arguments for add" in messages[1]["content"] and "unknown tool 'nope'" in messages[3]["content"]
    assert messages[4]["content"] == "3"
    assert metrics["tools/call_frequency"] == 3 and metrics["tools/failure_frequency"] == pytest.approx(2 / 3)
    assert metrics["tools/turns"] == 3 and metrics["tools/finished_ratio"] == 0.0  # stopped on unanswered calls


def test_completion_budget_counts_tool_tokens(tok):
    agent = Agent(AgentSpec([add]), tok, num_generations=1, max_completion_length=40)
    rollout, metrics = agent.rollout(None, ScriptedEngine(tok, lambda turn, text: call("add", a=1, b=2)),
                                     [{"prompt": _prompt()}], SamplingParams(n=1, max_new_tokens=40),
                                     [tok.convert_tokens_to_ids("<|im_end|>")])
    assert len(rollout.completion_ids[0]) <= 40 and rollout.truncated == [True]
    assert metrics["tools/finished_ratio"] == 0.0


class Counter:
    """An environment whose state is a counter (starts at the row's `start`)."""

    instances = 0

    def __init__(self):
        Counter.instances += 1
        self.count = 0
        self.calls = 0

    def reset(self, start=0, **kwargs):
        self.count, self.calls = int(start), 0
        return f" (the counter starts at {start})"

    def increment(self, by: int) -> int:
        """Add to the counter.

        Args:
            by: How much to add.
        """
        self.count += by
        self.calls += 1
        return self.count

    def get_reward(self) -> float:
        return float(self.count)


def _grpo(tok, engine, **kw):
    args = GRPOConfig(output_dir="/tmp/posttrain-test-multiturn", num_generations=2, per_device_train_batch_size=4,
                      max_completion_length=200, max_steps=1, report_to="none", save_strategy="no",
                      disable_tqdm=True, log_completions=False, chat_template="chatml")
    data = Dataset.from_list([{"prompt": _prompt(f"q{i}"), "start": 10 * i} for i in range(4)])
    return GRPOTrainer("tiny:nano", kw.pop("reward_funcs", None), args, data, processing_class=tok, engine=engine, **kw)


def test_environments_are_isolated_per_rollout_and_score_the_rollout(tok):
    seen = {}

    def reward(completions, environments, start, **kwargs):
        seen["envs"] = environments
        return [float(len(c)) for c in completions]

    script = lambda turn, text: call("increment", by=turn + 1) if turn < 2 else "done"  # noqa: E731
    trainer = _grpo(tok, ScriptedEngine(tok, script), reward_funcs=[reward], environment_factory=Counter)
    rows = [trainer.train_dataset[i] for i in range(2)]
    scored = trainer.score(rows, trainer.rollout(rows, "train"), "train")
    envs = scored.rollout.environments
    assert len(envs) == 4 and len({id(e) for e in envs}) == 4  # one instance per rollout
    assert [e.count for e in envs] == [0 + 3, 0 + 3, 10 + 3, 10 + 3] and all(e.calls == 2 for e in envs)
    assert seen["envs"] == envs
    assert scored.rewards.names == ["reward", "Counter"]
    assert scored.rewards.per_func[:, 1].tolist() == [3.0, 3.0, 13.0, 13.0]
    # the observation reset() returned is in the prompt the model saw; the tools are in its system prompt
    prompt_text = tok.decode(scored.rollout.prompt_ids[2])
    assert "q1 (the counter starts at 10)" in prompt_text and '"name": "increment"' in prompt_text
    # the pool is reused: a second generation creates no new instances
    before = Counter.instances
    trainer.rollout(rows, "train")
    assert Counter.instances == before


def test_trainer_masks_tool_tokens_out_of_the_loss(tok):
    trainer = _grpo(tok, ScriptedEngine(tok, _three_turns), reward_funcs=[lambda completions, **kw: [1.0] * len(completions)],
                    tools=[add])
    trainer.args.beta = 0.0
    rows = [trainer.train_dataset[i] for i in range(2)]
    scored = trainer.score(rows, trainer.rollout(rows, "train"), "train")
    batch = trainer.prepare(scored, "train")
    expected = torch.tensor(scored.rollout.tool_mask, dtype=torch.float32)
    assert torch.equal(batch.completion_mask, expected)
    assert 0 < batch.num_loss_tokens < sum(len(c) for c in batch.completion_ids)
    # split into micro-batches: the mask travels with its completions
    parts = batch.split(2, torch.Generator().manual_seed(0))
    assert sum(p.num_loss_tokens for p in parts) == batch.num_loss_tokens
    # dynamic sampling's select/concat keeps the multi-turn fields
    picked = scored.select_groups([1])
    assert picked.rollout.tool_mask == scored.rollout.tool_mask[2:] and len(picked.rollout.messages) == 2


def test_rollout_func_output_and_extra_fields_reach_the_rewards(tok):
    got = {}

    def rollout_func(prompts, trainer):
        n = trainer.args.num_generations
        ids = [tok("hi", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]] * (len(prompts) * n)
        return {"prompt_ids": [[1, 2]] * len(prompts), "completion_ids": ids, "logprobs": [[-0.5] * len(c) for c in ids],
                "env_mask": [[1] * (len(c) - 1) + [0] for c in ids], "judge_note": list(range(len(ids)))}

    def reward(completions, judge_note, **kwargs):
        got["note"] = judge_note
        return [0.0] * len(completions)

    trainer = _grpo(tok, ScriptedEngine(tok, _three_turns), reward_funcs=[reward], rollout_func=rollout_func)
    rows = [trainer.train_dataset[i] for i in range(2)]
    scored = trainer.score(rows, trainer.rollout(rows, "train"), "train")
    assert got["note"] == [0, 1, 2, 3] and scored.rollout.prompt_index == [0, 0, 1, 1]
    assert scored.rollout.prompt_ids[1] == [1, 2]
    batch = trainer.prepare(scored, "train")
    assert batch.completion_mask[:, -1].sum() == 0


def test_bad_inputs_are_refused_before_training(tok):
    class NoReset:
        def act(self, x: int) -> int:
            """Act.

            Args:
                x: x.
            """
            return x

    with pytest.raises(ValueError, match="must define a callable reset"):
        AgentSpec(environment_factory=NoReset)
    plain = build_tokenizer()  # its own ChatML template renders no tools
    with pytest.raises(ValueError, match="does not render tools"):
        Agent(AgentSpec([add]), plain, num_generations=1, max_completion_length=8)
    with pytest.raises(ValueError, match="rollout_func must return keys"):
        trainer = _grpo(tok, ScriptedEngine(tok, _three_turns), reward_funcs=[lambda completions, **k: [0.0] * len(completions)],
                        rollout_func=lambda prompts, trainer: {"completion_ids": []})
        trainer.rollout([trainer.train_dataset[0]], "train")


def test_rloo_takes_tools_and_keeps_tool_tokens_out_of_its_kl(tok):
    from posttrain import RLOOConfig, RLOOTrainer
    from posttrain.losses.rloo import sequence_kl

    args = RLOOConfig(output_dir="/tmp/posttrain-test-multiturn-rloo", num_generations=2, per_device_train_batch_size=4,
                      max_completion_length=200, max_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
                      log_completions=False, beta=0.1)
    data = Dataset.from_list([{"prompt": _prompt(f"q{i}")} for i in range(4)])
    trainer = RLOOTrainer("tiny:nano", [lambda completions, **kw: [float(len(c)) for c in completions]], args, data,
                          processing_class=tok, engine=ScriptedEngine(tok, _three_turns), tools=[add])
    with torch.no_grad():  # the policy moves away from its reference
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.prepare(trainer.score(rows, trainer.rollout(rows, "train"), "train"), "train")
    full = torch.ones_like(batch.completion_mask) * (batch.completion_mask.sum(1, keepdim=True) > 0)
    full = full * torch.tensor([[1.0] * len(c) + [0.0] * (batch.completion_mask.shape[1] - len(c))
                                for c in batch.completion_ids])
    tool_only = sequence_kl(batch.old_logps, batch.ref_logps, batch.completion_mask)
    everything = sequence_kl(batch.old_logps, batch.ref_logps, full)
    assert not torch.allclose(tool_only, everything)  # the tool tokens would change the KL ...
    logged = trainer._metrics["train"]["kl"][-1]
    assert logged == pytest.approx(float(tool_only.sum() / batch.completion_mask.sum()), rel=1e-5)  # ... and do not
