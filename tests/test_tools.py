"""Tool schemas, tool-call parsing and tool execution (posttrain.online.tools)."""

from __future__ import annotations

import asyncio
import time

import pytest

from posttrain.online.tools import ToolBox, ToolCall, environment_tools, parse_tool_calls, tool_schema


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


async def shout(text: str) -> str:
    """Upper-case a text.

    Args:
        text: What to upper-case.
    """
    await asyncio.sleep(0)
    return text.upper()


def hang(seconds: float) -> str:
    """Sleep for a while.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "woke up"


async def hang_async(seconds: float) -> str:
    """Sleep for a while, asynchronously.

    Args:
        seconds: How long.
    """
    await asyncio.sleep(seconds)
    return "woke up"


def boom() -> str:
    """Always fails."""
    raise RuntimeError("the disk is on fire")


def test_schema_from_type_hints_and_docstring():
    schema = tool_schema(add)
    assert schema["type"] == "function"
    fn = schema["function"]
    assert fn["name"] == "add" and fn["description"] == "Add two integers."
    assert fn["parameters"]["properties"] == {"a": {"type": "integer", "description": "The first number."},
                                              "b": {"type": "integer", "description": "The second number."}}
    assert fn["parameters"]["required"] == ["a", "b"]


def test_schema_of_an_undocumented_tool_names_it():
    def bare(x):
        return x

    with pytest.raises(ValueError, match="tool 'bare'"):
        tool_schema(bare)


def test_environment_methods_are_tools_without_reset_and_reward():
    class Env:
        def reset(self, **kwargs):
            return None

        def get_reward(self):
            return 1.0

        def look(self, key: str) -> str:
            """Look a key up.

            Args:
                key: The key.
            """
            return key

        def _private(self):
            pass

    tools = environment_tools(Env())
    assert [t.__name__ for t in tools] == ["look"]
    assert tool_schema(tools[0])["function"]["parameters"]["properties"] == {"key": {"type": "string", "description": "The key."}}


def test_parse_well_formed_and_several_calls():
    text = ('Let me compute. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
            '<tool_call>{"name": "shout", "arguments": {"text": "hi"}}</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == "Let me compute."
    assert [(c.name, c.arguments, c.error) for c in calls] == [("add", {"a": 1, "b": 2}, None),
                                                              ("shout", {"text": "hi"}, None)]


def test_parse_no_call_keeps_the_text():
    assert parse_tool_calls("The answer is 3.") == ("The answer is 3.", [])


@pytest.mark.parametrize("body, message", [
    ('{"name": "add", "arguments": {"a": 1,', "not valid JSON"),
    ('["add"]', "must be a JSON object"),
    ('{"name": "add", "arguments": [1, 2]}', "arguments must be a JSON object"),
])
def test_parse_malformed_calls_become_errors(body, message):
    _, calls = parse_tool_calls(f"<tool_call>{body}</tool_call>")
    assert len(calls) == 1 and message in calls[0].error
    result = ToolBox([add]).run(calls)[0]
    assert result.failed and message in result.content and result.content.startswith("{'error'")


def test_parse_unclosed_call_at_the_length_limit():
    _, calls = parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1, "b"')
    assert len(calls) == 1 and "not valid JSON" in calls[0].error


def test_arguments_given_as_a_json_string():
    _, calls = parse_tool_calls('<tool_call>{"name": "add", "arguments": "{\\"a\\": 4, \\"b\\": 5}"}</tool_call>')
    assert ToolBox([add]).run(calls)[0].content == "9"


def test_execution_results_and_errors():
    box = ToolBox([add, shout, boom])
    results = box.run([ToolCall("add", {"a": 2, "b": 3}), ToolCall("shout", {"text": "ok"}),
                       ToolCall("nope", {}), ToolCall("add", {"a": 1}), ToolCall("add", {"a": 1, "b": 2, "c": 3}),
                       ToolCall("boom", {})])
    assert [r.content for r in results[:2]] == ["5", "OK"] and not any(r.failed for r in results[:2])
    assert all(r.failed for r in results[2:])
    assert "unknown tool 'nope'" in results[2].content and "add" in results[2].content
    assert "wrong arguments for add" in results[3].content and "missing" in results[3].content
    assert "wrong arguments for add" in results[4].content
    assert "RuntimeError: the disk is on fire" in results[5].content
    assert results[0].as_message() == {"role": "tool", "name": "add", "content": "5"}


@pytest.mark.parametrize("tool", [hang, hang_async])
def test_a_hanging_tool_is_cut_at_its_timeout(tool):
    box = ToolBox([tool], timeout=0.2)
    start = time.perf_counter()
    result = box.run([ToolCall(tool.__name__, {"seconds": 30})])[0]
    assert time.perf_counter() - start < 2.0
    assert result.failed and "did not return within 0.2 s" in result.content
    assert box.run([ToolCall(tool.__name__, {"seconds": 0})])[0].content == "woke up"


def test_duplicate_names_and_bad_timeout_are_refused():
    def add(x: int) -> int:  # noqa: F811 - a second tool of the same name
        """Shadow.

        Args:
            x: x.
        """
        return x

    with pytest.raises(ValueError, match="two tools are named 'add'"):
        ToolBox([globals()["add"], add])
    with pytest.raises(ValueError, match="tool_timeout"):
        ToolBox([boom], timeout=0)


def test_the_tokenizers_own_response_parser_is_used_when_it_has_one():
    class Tok:  # a tokenizer with transformers' response parsing (response_template + parse_response)
        response_template = {"x-regex": "..."}

        def __init__(self):
            self.seen = None

        def parse_response(self, ids, prefix=None, tools=None):
            self.seen = (ids, prefix, tools)
            return {"role": "assistant", "content": "thinking",
                    "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}},
                                   {"type": "function", "function": {"name": "add", "arguments": "oops"}}]}

    tok = Tok()
    content, calls = parse_tool_calls("ignored text", tok, prompt_ids=[1, 2], completion_ids=[3, 4], tools=[add])
    assert tok.seen == ([3, 4], [1, 2], [add])
    assert content == "thinking" and calls[0] == ToolCall("add", {"a": 1, "b": 2})
    assert "must be a JSON object" in calls[1].error
