"""The built-in tool task (posttrain.tasks.lookup): data, environment, reward, and SFT transcripts whose
rendered tool calls are exactly what the RL loop parses."""

from __future__ import annotations

import json

import pytest

from posttrain.data.templates import render_chat, trainer_tokenizer
from posttrain.models import build_tokenizer
from posttrain.online.tools import ToolBox, environment_tools, parse_tool_calls
from posttrain.tasks.lookup import LookupEnv, LookupTask, lookup_accuracy


def test_rows_env_and_reward():
    task = LookupTask(keys=4, seed=1)
    rows = task.prompt_only(20)
    assert rows.column_names == ["prompt", "table", "answer"]
    assert task.prompt_only(20)["table"] == rows["table"]  # seeded
    assert task.prompt_only(20, "test")["table"] != rows["table"]  # splits differ
    env = LookupEnv()
    for row in rows:
        env.reset(**row)
        key = row["prompt"][0]["content"].split("key ")[1].rstrip("?")
        assert sorted(env.table) == ["a", "b", "c", "d"] and env.lookup(key) == row["answer"]
    results = ToolBox(environment_tools(env)).run(parse_tool_calls('<tool_call>{"name": "lookup", "arguments": {"key": "z"}}</tool_call>')[1])
    assert results[0].failed and "ValueError: no key" in results[0].content and "in the store" in results[0].content
    done = [[{"role": "assistant", "content": "<answer>7</answer>"}], [{"role": "assistant", "content": "7"}]]
    assert lookup_accuracy(None, done, ["7", "7"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="keys=0"):
        LookupTask(keys=0)


def test_sft_transcripts_render_calls_the_rl_loop_parses():
    tok = trainer_tokenizer(build_tokenizer(), "chatml")[1]
    row = LookupTask(keys=4).sft_transcripts(3)[0]
    messages, tools = row["messages"], json.loads(row["tools"])
    assert tools[0]["function"]["name"] == "lookup"
    text = render_chat(tok, messages, tools=tools)
    assert '"name": "lookup"' in text.split("<|im_start|>user")[0]  # the schema is in the system turn
    turn = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    _, calls = parse_tool_calls(turn)
    assert [(c.name, c.arguments) for c in calls] == [("lookup", messages[1]["tool_calls"][0]["arguments"])]
    assert f"<|im_start|>tool\n{messages[2]['content']}<|im_end|>" in text


def test_sft_transcripts_answer_only_and_wrong_key_shares():
    task = LookupTask(keys=4, seed=0)
    plain = task.sft_transcripts(200)
    assert all(len(r["messages"]) == 4 for r in plain)
    short = task.sft_transcripts(200, answer_only=0.5)
    skipped = [r for r in short if len(r["messages"]) == 2]
    assert 60 < len(skipped) < 140 and all(r["messages"][1]["content"].startswith("<answer>") for r in skipped)
    careless = task.sft_transcripts(200, wrong_key=0.6)
    for row, ref in zip(careless, plain):
        key = row["messages"][1]["tool_calls"][0]["arguments"]["key"]
        assert row["messages"][0] == ref["messages"][0]  # the same questions
        assert row["messages"][3]["content"] == f"<answer>{row['messages'][2]['content']}</answer>"  # copies the tool
        assert key in ("a", ref["messages"][1]["tool_calls"][0]["arguments"]["key"])
    wrong = sum(r["messages"][1]["tool_calls"][0]["arguments"] != p["messages"][1]["tool_calls"][0]["arguments"]
                for r, p in zip(careless, plain))
    assert 60 < wrong < 140  # ~0.6 of the 3/4 of rows that do not ask for a
    with pytest.raises(ValueError, match="wrong_key"):
        task.sft_transcripts(2, wrong_key=1.5)


def test_tool_exact_match_runs_the_tool_loop_greedily():
    from posttrain.models import build_tiny
    from posttrain.tasks import exact_match, tool_exact_match

    from _agent_helpers import ScriptedEngine, call

    model, tok = build_tiny("nano")
    tok = trainer_tokenizer(tok, "chatml")[1]
    rows = LookupTask(keys=4, seed=0).prompt_only(6, "test")

    def script(turn: int, text: str) -> str:  # call the asked key, then copy the result; key c is misread as a
        key = text.split("under key ")[-1][0]
        return call("lookup", key="a" if key == "c" else key) if turn == 0 else \
            f"<answer>{text.split('<|im_start|>tool')[-1].split()[0]}</answer>"

    engine = ScriptedEngine(tok, script)
    acc, samples = tool_exact_match(model, tok, rows, environment_factory=LookupEnv, engine=engine,
                                    max_tool_calling_iterations=2, return_samples=True)
    expected = [r["answer"] == json.loads(r["table"])["a" if "key c" in r["prompt"][0]["content"] else
                                                      r["prompt"][0]["content"][-2]] for r in rows]
    assert [ok for _, _, ok in samples] == expected and acc == sum(expected) / len(rows)
    assert all(m[1]["role"] == "tool" for _, m, _ in samples)  # the tool ran at evaluation
    assert all("<tools>" in tok.decode(p) for p in engine.requests[0])  # the schema is in the prompt
    # without tools it is exact_match: one turn, no schema in the prompt
    assert tool_exact_match(model, tok, rows, max_new_tokens=4, return_samples=True) == \
        exact_match(model, tok, rows, max_new_tokens=4, conversational=True, return_samples=True)
