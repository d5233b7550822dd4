"""A built-in task that needs a tool: answer with the value a key-value store holds for a key.

Why this task: the value is *not* in the prompt, only in the environment, so a model without the tool
is at chance (1 in 10) however well it is trained, and a model with it must (1) call the tool with the
right key, copied from the question, and (2) copy the tool's result into its answer. Both are a single
token of copying, which a tiny model learns from a few hundred SFT steps on a CPU (the key within ~40 steps
at batch 16, the tool's result only after a plateau of 140 or more), so the task shows that tool use is
learned and that it is what raises accuracy.

One episode::

    user:       What is stored under key q?
    assistant:  <tool_call>{"name": "lookup", "arguments": {"key": "q"}}</tool_call>
    tool:       7
    assistant:  <answer>7</answer>

`LookupEnv` is the environment (``environment_factory=LookupEnv``: ``reset(table=...)`` loads the row's
table, its ``lookup`` method is the tool); `LookupTask` makes prompt-only rows for online RL (columns
``prompt``, ``table`` (JSON), ``answer``) and SFT transcripts with the tool call and its result
(``messages`` and ``tools`` columns); `lookup_accuracy` is the reward (the arithmetic task's answer check).
"""

from __future__ import annotations

import json
import random
import string
from typing import Any, Sequence

import datasets

from ..online.tools import tool_schema
from .arithmetic import accuracy_reward

__all__ = ["LookupEnv", "LookupTask", "lookup_accuracy"]


class LookupEnv:
    """A key-value store for one rollout; its one tool is `lookup`."""

    def __init__(self) -> None:
        self.table: dict[str, str] = {}
        self.queries = 0

    def reset(self, table: str | dict | None = None, **kwargs: Any) -> None:
        """Load the row's table (a dict or its JSON); the prompt stays as it is."""
        self.table = dict(json.loads(table) if isinstance(table, str) else (table or {}))
        self.queries = 0

    def lookup(self, key: str) -> str:
        """Look up the value stored under a key.

        Args:
            key: The key to look up.
        """
        self.queries += 1
        if key not in self.table:
            raise ValueError(f"no key {key!r} in the store")
        return str(self.table[key])


def lookup_accuracy(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any],
                    **kwargs: Any) -> list[float]:
    """1.0 when the final ``<answer>`` equals the stored value (``answer`` column), else 0.0."""
    return accuracy_reward(prompts, completions, answer)


class LookupTask:
    """Rows of the lookup task: tables over the first ``keys`` letters (``a``, ``b``, ...), each holding a
    random digit; the question asks for one key. Guessing a key scores ``1 / keys`` with the tool, a tenth
    without; copying the asked key into the call scores 1."""

    def __init__(self, keys: int = 4, seed: int = 0) -> None:
        if not 1 <= keys <= 26:
            raise ValueError(f"keys={keys}: expected 1..26")
        self.keys, self.seed = keys, seed

    @staticmethod
    def tools() -> list[dict]:
        """The tool schemas (what the chat template renders for the model)."""
        return [tool_schema(LookupEnv().lookup)]

    def _episodes(self, n: int, split: str) -> list[dict]:
        rng = random.Random(f"{self.seed}-{split}")
        out = []
        for _ in range(n):
            table = {k: str(rng.randrange(10)) for k in string.ascii_lowercase[:self.keys]}
            key = rng.choice(sorted(table))
            out.append({"key": key, "table": table, "answer": table[key]})
        return out

    @staticmethod
    def question(key: str) -> str:
        return f"What is stored under key {key}?"

    def prompt_only(self, n: int, split: str = "train") -> datasets.Dataset:
        """``prompt`` (a user message), ``table`` (JSON, for `LookupEnv.reset`), ``answer``."""
        return datasets.Dataset.from_list([
            {"prompt": [{"role": "user", "content": self.question(e["key"])}], "table": json.dumps(e["table"]),
             "answer": e["answer"]} for e in self._episodes(n, split)])

    def sft_transcripts(self, n: int, split: str = "sft", answer_only: float = 0.0,
                        wrong_key: float = 0.0) -> datasets.Dataset:
        """Whole episodes for SFT: ``messages`` (the call, its result, the answer) and the ``tools`` they use.

        ``answer_only``: the share of rows (seeded) where the demonstrator, who sees the table, skips the call
        and states the value at once (the tool is still offered). A model cannot copy that (the value is not in
        its prompt), so on those rows it learns to guess; SFT on the mix leaves a model that often answers
        without looking, which online RL with the tool then moves to the call that pays (as the quickstart's
        ``sft_answer_only`` does for worked sums).

        ``wrong_key``: the share of the calling rows (seeded) where a careless demonstrator looks up the first
        key (``a``) whatever was asked, and answers with what the tool returned (wrong unless ``a`` was asked
        or the values agree). Every row still shows the copy of the tool's result into the answer, so SFT
        learns that copy from all of them, while its greedy call follows the careless majority; online RL,
        rewarded for the right answer, moves the call to the asked key."""
        for name, share in (("answer_only", answer_only), ("wrong_key", wrong_key)):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{name} must be a fraction in [0, 1], got {share}")
        careless = random.Random(f"{self.seed}-{split}-wrong-key")
        tools = json.dumps(self.tools())
        rng = random.Random(f"{self.seed}-{split}-answer-only")
        rows = []
        for e in self._episodes(n, split):
            question = {"role": "user", "content": self.question(e["key"])}
            answer = {"role": "assistant", "content": f"<answer>{e['answer']}</answer>"}
            if answer_only > 0 and rng.random() < answer_only:
                rows.append({"messages": [question, answer], "tools": tools})
                continue
            key = "a" if wrong_key > 0 and careless.random() < wrong_key else e["key"]
            value = e["table"][key]
            call = {"name": "lookup", "arguments": {"key": key}}
            rows.append({"messages": [
                question,
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": "lookup", "content": value},
                {"role": "assistant", "content": f"<answer>{value}</answer>"},
            ], "tools": tools})
        return datasets.Dataset.from_list(rows)

