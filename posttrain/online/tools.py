"""Tools for agentic rollouts: their schemas, the parsing of the model's calls, and their execution.

A *tool* is a plain Python function (sync or ``async``) with type hints and a Google-style docstring, or a
bound method of an environment. `ToolBox` holds the tools of one rollout:

- **schemas**: the JSON schemas the chat template renders (``apply_chat_template(tools=...)``), made by
  transformers' own `get_json_schema` from the type hints and the docstring, so they are the ones
  the model saw in SFT data rendered with the same tools;
- **parsing** (`parse_tool_calls`): the model's calls read from its text in the template's format. The
  tokenizer's own parser (``tokenizer.parse_response`` with its ``response_template``) is used where the
  tokenizer has one; otherwise the Qwen / Hermes format ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  that posttrain's chatml template renders. A call that does not parse is kept as a `ToolCall` with an
  ``error``, so the model is told what went wrong;
- **execution** (`ToolBox.run`): arguments are bound to the function's signature first (a wrong or missing
  argument is an error message, not an exception in the trainer); sync tools run on a daemon thread and
  async tools on an event loop, each cut at ``timeout`` seconds. Every failure (unknown tool, bad JSON,
  wrong arguments, an exception, a timeout) becomes the tool message ``{'error': '...'}`` and is counted;
  the rollout goes on. Nothing the model wrote is ever evaluated as code.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

__all__ = ["ToolBox", "ToolCall", "ToolResult", "environment_tools", "parse_tool_calls", "tool_schema"]

_HERMES_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def tool_schema(fn: Callable) -> dict[str, Any]:
    """The JSON schema of a tool, from its name, type hints and docstring (transformers' `get_json_schema`,
    what ``apply_chat_template(tools=[fn])`` renders). Raises ValueError naming the tool when its hints or
    docstring cannot describe it."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as err:  # DocstringParsingException, TypeHintParsingException
        name = getattr(fn, "__name__", repr(fn))
        raise ValueError(f"tool {name!r}: cannot build its JSON schema from type hints and docstring ({err}); "
                         "every argument needs a type hint and an 'Args:' line in the docstring") from None


def environment_tools(env: Any) -> list[Callable]:
    """The public methods of an environment instance, as tools (``reset`` and ``get_reward`` excluded;
    looked up on the class so that properties are not evaluated)."""
    names = [n for n, _ in inspect.getmembers(type(env), predicate=inspect.isfunction)
             if not n.startswith("_") and n not in ("reset", "get_reward")]
    return [getattr(env, n) for n in names]


@dataclass
class ToolCall:
    """One call the model wrote: ``name`` and ``arguments``, or ``error`` when it could not be read."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def as_message_call(self) -> dict[str, Any]:
        """The call as an assistant message's ``tool_calls`` entry (OpenAI / transformers shape)."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolResult:
    """What a call returned (``content``, the tool message's text) and whether it failed."""

    name: str
    content: str
    failed: bool = False

    def as_message(self) -> dict[str, str]:
        return {"role": "tool", "name": self.name, "content": self.content}


def _call_from_json(raw: str) -> ToolCall:
    try:
        data = json.loads(raw.strip())
    except json.JSONDecodeError as err:
        return ToolCall("unknown", error=f"the tool call is not valid JSON ({err.msg} at char {err.pos})")
    if isinstance(data, dict) and isinstance(data.get("function"), dict):  # {"type": "function", "function": {...}}
        data = data["function"]
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return ToolCall("unknown", error='a tool call must be a JSON object {"name": ..., "arguments": {...}}')
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    if not isinstance(args, dict):
        return ToolCall(data["name"], error="the tool call's arguments must be a JSON object")
    return ToolCall(data["name"], args)


def parse_tool_calls(text: str, tokenizer: Any = None, prompt_ids: Sequence[int] | None = None,
                     completion_ids: Sequence[int] | None = None,
                     tools: Sequence[Any] | None = None) -> tuple[str, list[ToolCall]]:
    """``(content, calls)`` of one assistant turn: the text outside the calls, and the calls in order.

    With a tokenizer that has a ``response_template`` (transformers' response parsing), its
    ``parse_response`` reads the turn (``completion_ids`` after ``prompt_ids``); otherwise the Hermes /
    Qwen format: every ``<tool_call>...</tool_call>`` block holds one JSON object (an unclosed last block
    counts, so a turn cut at its length limit still reports its malformed call).
    """
    if tokenizer is not None and getattr(tokenizer, "response_template", None) is not None and completion_ids is not None:
        try:
            message = tokenizer.parse_response(list(completion_ids), prefix=list(prompt_ids or []), tools=tools)
        except Exception as err:  # the model's output does not follow the template
            return text, [ToolCall("unknown", error=f"the response does not parse: {err}")]
        calls = []
        for call in message.get("tool_calls") or []:
            fn = call.get("function", call)
            args = fn.get("arguments", {})
            calls.append(ToolCall(str(fn.get("name")), args) if isinstance(args, dict)
                         else ToolCall(str(fn.get("name")), error="the tool call's arguments must be a JSON object"))
        return str(message.get("content") or ""), calls
    calls = [_call_from_json(m.group(1)) for m in _HERMES_CALL.finditer(text)]
    content = _HERMES_CALL.sub("", text).strip() if calls else text
    return content, calls


def _error(message: str) -> str:
    return str({"error": message})


class ToolBox:
    """The tools one rollout may call, by name (see the module docstring)."""

    def __init__(self, tools: Sequence[Callable], timeout: float | None = None) -> None:
        self.tools: dict[str, Callable] = {}
        for fn in tools:
            name = getattr(fn, "__name__", None)
            if not callable(fn) or not name:
                raise TypeError(f"a tool must be a named function or method, got {fn!r}")
            if name in self.tools and self.tools[name] is not fn:
                raise ValueError(f"two tools are named {name!r}; tool names must be unique")
            self.tools[name] = fn
        if timeout is not None and timeout <= 0:
            raise ValueError(f"tool_timeout={timeout}: expected seconds > 0 (or None: no limit)")
        self.timeout = timeout

    @property
    def schemas(self) -> list[dict[str, Any]]:
        return [tool_schema(fn) for fn in self.tools.values()]

    def run(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        """Execute the calls of one turn in order; one result per call (failures included)."""
        return [self._run_one(call) for call in calls]

    def _run_one(self, call: ToolCall) -> ToolResult:
        if call.error is not None:
            return ToolResult(call.name, _error(call.error), failed=True)
        fn = self.tools.get(call.name)
        if fn is None:
            return ToolResult(call.name, _error(f"unknown tool {call.name!r}; the tools are {sorted(self.tools)}"), True)
        try:
            inspect.signature(fn).bind(**call.arguments)
        except TypeError as err:
            return ToolResult(call.name, _error(f"wrong arguments for {call.name}: {err}"), failed=True)
        try:
            value = self._execute(fn, call.arguments)
        except TimeoutError:
            return ToolResult(call.name, _error(f"{call.name} did not return within {self.timeout} s"), failed=True)
        except Exception as err:  # the tool's own failure is the model's problem to handle
            return ToolResult(call.name, _error(f"{type(err).__name__}: {err}"), failed=True)
        return ToolResult(call.name, value if isinstance(value, str) else str(value))

    def _execute(self, fn: Callable, arguments: dict[str, Any]) -> Any:
        if inspect.iscoroutinefunction(fn):
            async def bounded() -> Any:
                return await asyncio.wait_for(fn(**arguments), self.timeout)

            try:
                return asyncio.run(bounded())
            except asyncio.TimeoutError:
                raise TimeoutError from None
        if self.timeout is None:
            return fn(**arguments)
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = fn(**arguments)
            except BaseException as err:  # handed to the caller's thread
                box["error"] = err

        # a daemon thread: a tool that never returns is abandoned, not waited for (Python cannot kill a thread)
        worker = threading.Thread(target=target, daemon=True, name=f"tool-{fn.__name__}")
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            raise TimeoutError
        if "error" in box:
            raise box["error"]
        return box["value"]
