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
