"""Multi-turn rollouts with tools and environments: the rollout stage of an agent (TRL 1.16's ``tools=``,
``environment_factory=`` and ``rollout_func=``).

`Agent.rollout` replaces the one engine call of the rollout stage (`OnlineTrainer.generate_rollout`):

1. each of the ``num_prompts * num_generations`` rollouts gets its own environment instance (from a pool,
   ``reset(**row)`` before use; an observation it returns is appended to the last user message) and its
   prompt is rendered with its tools' schemas (``apply_chat_template(tools=...)``);
2. a turn: the engine samples one continuation of every unfinished rollout (one request per turn: the
   HF engine, vLLM colocated and the rollout server alike; tools and environments stay in this process);
3. its tool calls are parsed (`posttrain.online.tools.parse_tool_calls`) and executed; their results become
   ``tool`` messages, rendered by the chat template into *tokens* appended to the sequence;
4. repeat until the model answers without a call, ``max_tool_calling_iterations`` tool turns are done, or
   the completion budget ``max_completion_length`` (generated plus tool tokens) is spent.

Token-exact: a completion is the engine's sampled tokens with the template's tool-result tokens between
turns, never a re-tokenization of decoded text. ``Rollout.tool_mask`` marks which tokens the model generated
(1: trained, in the loss and the KL) and which it did not (0: tool output and template text); the sampler's
log-probs line up with the tokens (0.0 at masked positions). The tool-result tokens come from rendering a
short dummy conversation with and without the tool messages and keeping the difference, so they are exactly
what the template puts between an assistant turn and the next generation prompt.

``rollout_func(prompts, trainer) -> dict`` is the escape hatch: it returns ``prompt_ids``, ``completion_ids``
and ``logprobs`` (one entry per completion, ``num_generations`` per prompt), optionally ``env_mask`` (the
tool mask); every other key goes to the reward functions as a column.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from ..data.templates import end_of_turn, render_chat
from .engines import Rollout, RolloutEngine, SamplingParams
from .tools import ToolBox, ToolCall, environment_tools, parse_tool_calls

__all__ = ["Agent", "AgentSpec"]

_DUMMY_USER = {"role": "user", "content": "x"}


class AgentSpec:
    """What a trainer was given (``tools``, ``environment_factory``, ``rollout_func``), checked before the
    trainer is built: each environment is probed once (it must have ``reset``; its public methods are its
    tools), and an environment's ``get_reward`` becomes a reward function named after its class."""

    def __init__(self, tools: Sequence[Callable] | None = None, environment_factory: Any = None,
                 rollout_func: Callable | None = None) -> None:
        self.tools = list(tools or [])
        self.rollout_func = rollout_func
        self.multi_env = isinstance(environment_factory, dict)
        if environment_factory is None:
            self.factories = None
        else:
            self.factories = dict(environment_factory) if self.multi_env else {None: environment_factory}
        self.pools: dict[Any, list[Any]] = {}
        self.reward_funcs: list[Callable] = []
        for name, factory in (self.factories or {}).items():
            if not callable(factory):
                raise TypeError(f"environment_factory[{name!r}] must be a callable returning an environment")
            probe = factory()
            if not callable(getattr(probe, "reset", None)):
                raise ValueError(f"the environment {type(probe).__name__} made by environment_factory"
                                 f"{'' if name is None else f'[{name!r}]'} must define a callable reset()")
            ToolBox(self.tools + environment_tools(probe))  # names must not clash
            self.pools[name] = [probe]
            if callable(getattr(probe, "get_reward", None)) and type(probe) not in [getattr(f, "_env_type", None)
                                                                                      for f in self.reward_funcs]:
                self.reward_funcs.append(_env_reward(type(probe)))

    def __bool__(self) -> bool:
        return bool(self.tools or self.factories or self.rollout_func)


def _env_reward(env_type: type) -> Callable:
    """A reward function scoring a rollout by its environment's ``get_reward()`` (None for other environments)."""
    if inspect.iscoroutinefunction(env_type.get_reward):
        async def reward(environments: list, **kwargs: Any) -> list:
            return [await e.get_reward() if type(e) is env_type else None for e in environments]
    else:
        def reward(environments: list, **kwargs: Any) -> list:
            return [e.get_reward() if type(e) is env_type else None for e in environments]
    reward.__name__ = env_type.__name__
    reward._env_type = env_type  # type: ignore[attr-defined]
    return reward


@dataclass
class _Trajectory:
    """One rollout in progress."""

    prompt_ids: list[int]
    toolbox: ToolBox | None
    env: Any = None
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    calls: int = 0
    errors: int = 0
    turns: int = 0
    finished: bool = False  # answered without a tool call, ending with a stop token
    truncated: bool = False  # ran into the completion budget
    tool_tokens: int = 0


class Agent:
    """The multi-turn rollout stage for one trainer (see the module docstring)."""

    def __init__(self, spec: AgentSpec, tokenizer: Any, *, num_generations: int, max_completion_length: int,
                 max_tool_calling_iterations: int | None = None, tool_timeout: float | None = None,
                 chat_template_kwargs: dict | None = None) -> None:
        self.spec, self.tokenizer = spec, tokenizer
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.num_generations, self.max_completion_length = num_generations, max_completion_length
        self.max_iterations = max_tool_calling_iterations
        self.tool_timeout = tool_timeout
        self.uses_tools = bool(spec.tools or spec.factories)
        if self.uses_tools:
            _check_template(tokenizer)
            self._eot = end_of_turn(tokenizer)
            self._suffix_cache: dict[tuple, list[int]] = {}

    # ------------------------------------------------------------------------------------- entry
    def rollout(self, trainer: Any, engine: RolloutEngine, rows: list[dict], params: SamplingParams,
                stop_ids: Sequence[int]) -> tuple[Rollout, dict[str, float]]:
        """The rollouts of ``rows`` (``params.n`` each, grouped by prompt) and their tool metrics."""
        if self.spec.rollout_func is not None:
            return self._custom(trainer, rows, params, stop_ids), {}
        n = params.n
        trajectories, prompt_index = [], []
        cursor: dict[Any, int] = {}
        for k, row in enumerate(rows):
            for _ in range(n):
                trajectories.append(self._start(row, cursor))
                prompt_index.append(k)
        self._loop(engine, trajectories, params, set(stop_ids))
        rollout = Rollout(
            prompt_index, [t.prompt_ids for t in trajectories], [t.ids for t in trajectories],
            [self.tokenizer.decode(t.ids, skip_special_tokens=True) for t in trajectories],
            [t.logps for t in trajectories], [t.truncated for t in trajectories],
            tool_mask=[t.mask for t in trajectories], messages=[t.messages for t in trajectories],
            environments=[t.env for t in trajectories] if self.spec.factories else None,
        ).check()
        return rollout, _metrics(trajectories)

    # ---------------------------------------------------------------------------------- the loop
    def _start(self, row: dict, cursor: dict[Any, int]) -> _Trajectory:
        prompt = row["prompt"]
        if not (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
            raise ValueError("tools and environments need conversational prompts ([{'role': 'user', 'content': ...}]); "
                             f"got {type(prompt).__name__}")
        env, tools = None, list(self.spec.tools)
        if self.spec.factories is not None:
            name = row.get("environment") if self.spec.multi_env else None
            if name not in self.spec.factories:
                raise ValueError(f"row has environment={name!r}, not one of environment_factory's "
                                 f"{sorted(map(str, self.spec.factories))}")
            pool, index = self.spec.pools[name], cursor.get(name, 0)
            if index == len(pool):
                pool.append(self.spec.factories[name]())
            cursor[name] = index + 1
            env = pool[index]
            kwargs = {k: v for k, v in row.items() if k not in ("environment", "prompt_ids", "prompt_truncated")}
            observation = env.reset(**kwargs)
            if isinstance(observation, str):
                prompt = prompt[:-1] + [{**prompt[-1], "content": str(prompt[-1]["content"]) + observation}]
            tools += environment_tools(env)
        toolbox = ToolBox(tools, timeout=self.tool_timeout) if tools else None
        schemas = toolbox.schemas if toolbox else None
        if self.chat_template_kwargs:
            text = self.tokenizer.apply_chat_template(list(prompt), tools=schemas, add_generation_prompt=True,
                                                      tokenize=False, **self.chat_template_kwargs)
        else:
            text = render_chat(self.tokenizer, list(prompt), add_generation_prompt=True, tools=schemas)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return _Trajectory(ids, toolbox, env)

    def _loop(self, engine: RolloutEngine, trajectories: list[_Trajectory], params: SamplingParams,
              stops: set[int]) -> None:
        active = list(trajectories)
        turn = 0
        while active:
            budgets = [self.max_completion_length - len(t.ids) for t in active]
            seed = None if params.seed is None else (params.seed + 7919 * turn) % (1 << 31)
            out = engine.generate([t.prompt_ids + t.ids for t in active],
                                  replace(params, n=1, max_new_tokens=max(budgets), seed=seed)).check()
            still = []
            for t, budget, ids, lps in zip(active, budgets, out.completion_ids, out.logprobs):
                ids, lps = list(ids[:budget]), list(lps[:budget])
                t.ids += ids
                t.mask += [1] * len(ids)
                t.logps += [float(x) for x in lps]
                t.turns += 1
                stopped = bool(ids) and ids[-1] in stops
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                content, calls = parse_tool_calls(text, self.tokenizer, t.prompt_ids + t.ids[:-len(ids) or None], ids,
                                                  list(t.toolbox.tools.values()) if t.toolbox else None)
                if not calls or t.toolbox is None:
                    t.messages.append({"role": "assistant", "content": text})
                    t.finished, t.truncated = stopped, not stopped
                    continue
                t.messages.append({"role": "assistant", "content": content,
                                   "tool_calls": [c.as_message_call() for c in calls]})
                if not stopped:  # the turn ran into the budget in the middle of its calls
                    t.truncated = True
                    continue
                if self.max_iterations is not None and t.turns > self.max_iterations:
                    continue  # the tool-turn budget is spent: the rollout ends on its unanswered calls
                results = t.toolbox.run(calls)
                t.calls += len(results)
                t.errors += sum(r.failed for r in results)
                tool_messages = [r.as_message() for r in results]
                t.messages += tool_messages
                suffix = self.tool_suffix_ids(tool_messages, calls)
                if len(t.ids) + len(suffix) >= self.max_completion_length:
                    t.truncated = True  # no room left for the results and an answer
                    continue
                t.ids += suffix
                t.mask += [0] * len(suffix)
                t.logps += [0.0] * len(suffix)
                t.tool_tokens += len(suffix)
                still.append(t)
            active = still
            turn += 1

    def tool_suffix_ids(self, tool_messages: list[dict], calls: Sequence[ToolCall] = ()) -> list[int]:
        """The tokens the chat template puts after an assistant turn that ended with its end-of-turn token:
        the tool messages and the next generation prompt (rendered on a dummy conversation, so they do not
        depend on what the model wrote)."""
        key = tuple((m["name"], m["content"]) for m in tool_messages)
        if key in self._suffix_cache:
            return self._suffix_cache[key]
        names = [c.name for c in calls] or [tool_messages[0]["name"]]
        assistant = {"role": "assistant", "content": "",
                     "tool_calls": [{"type": "function", "function": {"name": n, "arguments": {}}} for n in names]}
        prefix = render_chat(self.tokenizer, [_DUMMY_USER, assistant])
        full = render_chat(self.tokenizer, [_DUMMY_USER, assistant, *tool_messages], add_generation_prompt=True)
        if not full.startswith(prefix):
            raise ValueError("the chat template is not prefix-preserving: a conversation with tool messages does not "
                             "start with its rendering without them (set chat_template='chatml')")
        # what the template writes after the end-of-turn marker the model generated (e.g. the newline after <|im_end|>)
        cut = prefix.rindex(self._eot) + len(self._eot) if self._eot and self._eot in prefix else len(prefix)
        ids = list(self.tokenizer(prefix[cut:] + full[len(prefix):], add_special_tokens=False)["input_ids"])
        if len(self._suffix_cache) < 4096:
            self._suffix_cache[key] = ids
        return ids

    # ---------------------------------------------------------------------------- rollout_func
    def _custom(self, trainer: Any, rows: list[dict], params: SamplingParams, stop_ids: Sequence[int]) -> Rollout:
        out = self.spec.rollout_func([r["prompt"] for r in rows], trainer)
        if not isinstance(out, dict):
            raise TypeError(f"rollout_func must return a dict, got {type(out).__name__}")
        missing = sorted({"prompt_ids", "completion_ids", "logprobs"} - set(out))
        if missing:
            raise ValueError(f"rollout_func must return keys {missing} in its output dict")
        completions = [list(map(int, c)) for c in out["completion_ids"]]
        n, want = params.n, len(rows) * params.n
        if len(completions) != want:
            raise ValueError(f"rollout_func returned {len(completions)} completions for {len(rows)} prompts; expected "
                             f"{want} (num_generations={n} per prompt, grouped by prompt)")
        prompts = [list(map(int, p)) for p in out["prompt_ids"]]
        if len(prompts) == len(rows) and len(rows) != want:
            prompts = [p for p in prompts for _ in range(n)]
        logprobs = out["logprobs"]
        # a token's log-prob may come as [logprob] (the sampled token's entry of a top-k list, TRL's shape)
        logprobs = [[0.0] * len(c) for c in completions] if logprobs is None else [
            [float(x[0] if isinstance(x, (list, tuple)) else x) for x in row] for row in logprobs]
        extra = {k: list(v) for k, v in out.items()
                 if k not in ("prompt_ids", "completion_ids", "logprobs", "logprob_token_ids", "env_mask")}
        mask = out.get("env_mask")
        stops = set(stop_ids)
        return Rollout([j // n for j in range(want)], prompts, completions,
                       self.tokenizer.batch_decode(completions, skip_special_tokens=True), logprobs,
                       [not (c and c[-1] in stops) for c in completions],
                       tool_mask=None if mask is None else [list(map(int, m)) for m in mask],
                       extra_fields=extra or None).check()


def _check_template(tokenizer: Any) -> None:
    """Raise when the chat template does not render tool schemas (the model would never see its tools)."""
    probe = {"type": "function", "function": {"name": "posttrain_probe_tool", "description": "probe",
                                              "parameters": {"type": "object", "properties": {}}}}
    text = render_chat(tokenizer, [{"role": "user", "content": "hi"}], add_generation_prompt=True, tools=[probe])
    if "posttrain_probe_tool" not in text:
        raise ValueError("the tokenizer's chat template does not render tools, so the model cannot see them: use a "
                         "template that does (e.g. chat_template='chatml', posttrain's ChatML with Hermes tool calls)")


def _metrics(trajectories: list[_Trajectory]) -> dict[str, float]:
    """Per-rollout means: TRL's tools/call_frequency and tools/failure_frequency (failed / calls), plus
    turns, the share of rollouts that ended with an answer, and generated vs tool-result tokens."""
    n = max(len(trajectories), 1)
    calls = sum(t.calls for t in trajectories)
    return {
        "tools/call_frequency": calls / n,
        "tools/failure_frequency": sum(t.errors for t in trajectories) / calls if calls else 0.0,
        "tools/errors": float(sum(t.errors for t in trajectories)),
        "tools/turns": sum(t.turns for t in trajectories) / n,
        "tools/finished_ratio": sum(t.finished for t in trajectories) / n,
        "tools/completion_tokens": sum(sum(t.mask) for t in trajectories) / n,
        "tools/tool_tokens": sum(t.tool_tokens for t in trajectories) / n,
    }
