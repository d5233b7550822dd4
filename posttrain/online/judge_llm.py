"""A pairwise judge that asks a chat model which of two responses is better, and parses its verdict.

The model is either in process (a causal LM and its tokenizer, or a name / folder / ``tiny:`` spec; it
answers greedily through the rollout engine, `posttrain.online.engine_hf.HFEngine`) or behind any
OpenAI-compatible chat endpoint (``base_url``, e.g. a vLLM server: ``POST {base_url}/chat/completions``).

The prompt is `DEFAULT_PAIRWISE_TEMPLATE` unless the caller gives another (``template``, a ``str.format``
string with ``{prompt}``, ``{response0}`` and ``{response1}``); the reply is read by `parse_verdict` unless
the caller gives another parser (``parse_verdict``: reply text -> 0, 1 or -1). With ``shuffle_order`` each
pair is shown in a random order (seeded by ``seed``) and the verdict is mapped back, so a model that
prefers the first (or the second) position does not bias the preferences.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import re
import urllib.error
import urllib.request
from typing import Any, Callable, Sequence

from ..data.messages import completion_text
from .judges import BasePairwiseJudge, _check_pairs

__all__ = ["DEFAULT_PAIRWISE_TEMPLATE", "LLMPairwiseJudge", "OpenAIPairwiseJudge", "parse_verdict"]

DEFAULT_PAIRWISE_TEMPLATE = (
    "You compare two answers to the same request and decide which one serves the user better: more correct, "
    "more helpful, clearer. Ignore which answer comes first and how long each is.\n\n"
    "Request:\n{prompt}\n\n"
    "Answer 0:\n{response0}\n\n"
    "Answer 1:\n{response1}\n\n"
    "Reply with one character: 0 if Answer 0 is better, 1 if Answer 1 is better."
)

_TIE = re.compile(r"\b(tie|tied|draw|equal(ly)?( good| bad)?|same quality|neither|both (are )?(equally )?(good|bad))\b"
                  r"|\[\[\s*c\s*\]\]", re.I)
_ALIASES = {"0": 0, "1": 1, "a": 0, "b": 1, "first": 0, "second": 1}
_BRACKETED = re.compile(r"\[\[\s*([01ab])\s*\]\]", re.I)
_LABELLED = re.compile(
    r"(?:answer|response|output|assistant|verdict|winner|choice|better(?: one)?|preferred|prefer)\s*"
    r"(?:is|:|=|-)?\s*(?:answer|response|output)?\s*[\(\[\"'*]*\s*([01ab])\b", re.I)
_WORD = re.compile(r"(?<![\w.])([01ab])(?![\w.])", re.I)


def parse_verdict(text: str) -> int:
    """0 or 1 for the better answer named in a judge's reply, -1 for a tie or a reply it cannot read.

    Read, in this order: a tie (``tie``, ``equal``, ``[[C]]``, ...); a bracketed verdict (``[[A]]``, ``[[1]]``);
    a labelled one (``Answer: 1``, ``Output (a)``, ``The better response is B``; the last such mention wins,
    as judges reason first and conclude last); a reply that is only a label (``0``, ``b.``, ``"1"``); ``first``
    / ``second``; else a single standalone label if just one distinct label occurs. ``a``/``b`` mean 0/1.
    """
    reply = (text or "").strip()
    if not reply:
        return -1
    if _TIE.search(reply):
        return -1
    found = _BRACKETED.findall(reply) or _LABELLED.findall(reply)
    if found:
        return _ALIASES[found[-1].lower()]
    bare = reply.strip(" \t\n.,;:!*\"'`()[]").lower()
    if bare in ("0", "1", "a", "b", "first", "second"):
        return _ALIASES[bare]
    if re.search(r"\bfirst\b", reply, re.I) and not re.search(r"\bsecond\b", reply, re.I):
        return 0
    if re.search(r"\bsecond\b", reply, re.I) and not re.search(r"\bfirst\b", reply, re.I):
        return 1
    labels = {_ALIASES[m.lower()] for m in _WORD.findall(reply)}
    return labels.pop() if len(labels) == 1 else -1


def _text(value: Any) -> str:
    """A prompt or completion as plain text (a conversation: its messages' contents, one per line)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        return "\n".join(completion_text(m) for m in value)
    return completion_text(value)


class LLMPairwiseJudge(BasePairwiseJudge):
    """Asks a chat model which response is better.

    Args:
        model: an in-process causal LM (or its name, folder or ``tiny:`` spec), or, with ``base_url``, the
            model name sent to the endpoint.
        tokenizer: the in-process model's tokenizer (default: loaded from ``model`` when it is a name).
        base_url: an OpenAI-compatible API root (``http://host:port/v1``); the judge then POSTs to
            ``{base_url}/chat/completions``.
        template: the prompt, with ``{prompt}``, ``{response0}``, ``{response1}``.
        parse_verdict: reply text -> 0, 1 or -1 (default `parse_verdict`).
        system_prompt: a system message put before the prompt (none by default).
        max_new_tokens: the longest reply read.
        api_key: sent as ``Authorization: Bearer`` to the endpoint.
        timeout: seconds per HTTP request; max_workers: concurrent requests.
        seed: seeds the order shuffling.
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, base_url: str | None = None,
                 template: str = DEFAULT_PAIRWISE_TEMPLATE, parse_verdict: Callable[[str], int] = parse_verdict,
                 system_prompt: str | None = None, max_new_tokens: int = 16, api_key: str | None = None,
                 timeout: float = 60.0, max_workers: int = 8, seed: int = 0) -> None:
        for key in ("{prompt}", "{response0}", "{response1}"):
            if key not in template:
                raise ValueError(f"the judge template must contain {key} (it has the placeholders "
                                 f"{re.findall(r'{[^}]*}', template)})")
        self.template, self.parse, self.system_prompt = template, parse_verdict, system_prompt
        self.max_new_tokens, self.base_url, self.api_key = max_new_tokens, base_url, api_key
        self.timeout, self.max_workers = timeout, max_workers
        self.rng = random.Random(seed)
        self.replies: list[str] = []  # the last call's raw replies, in the order the pairs were given
        self.errors: list[str] = []  # endpoint failures seen so far (each made its pair's verdict -1)
        self.engine = None
        if base_url is None:
            from .engine_hf import HFEngine

            if isinstance(model, str):
                from ..models import load_model, load_tokenizer

                tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
                model = load_model(model)
            if tokenizer is None:
                raise ValueError("an in-process judge model needs its tokenizer (tokenizer=...)")
            self.engine = HFEngine(model, tokenizer, decode_loop=True)
        self.model = model

    def messages(self, prompt: Any, first: Any, second: Any) -> list[dict[str, str]]:
        """The chat the judge model sees for one (already ordered) pair."""
        content = self.template.format(prompt=_text(prompt), response0=_text(first), response1=_text(second))
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": content}]

    def judge(self, prompts: list[Any], completions: list[list[Any]], shuffle_order: bool = True) -> list[int]:
        _check_pairs(prompts, completions)
        flip = [shuffle_order and self.rng.random() < 0.5 for _ in prompts]
        chats = [self.messages(p, *(reversed(pair) if f else pair)) for p, pair, f in zip(prompts, completions, flip)]
        self.replies = self.complete(chats)
        out = []
        for reply, f in zip(self.replies, flip):
            v = self.parse(reply)
            if v not in (0, 1, -1):
                raise ValueError(f"the verdict parser returned {v!r} for reply {reply!r}; expected 0, 1 or -1")
            out.append(1 - v if (f and v != -1) else v)
        return out

    def complete(self, chats: Sequence[list[dict[str, str]]]) -> list[str]:
        """The judge model's reply to each chat."""
        if not chats:
            return []
        if self.engine is not None:
            from .engines import SamplingParams

            rollout = self.engine.generate(list(chats), SamplingParams(n=1, temperature=0.0,
                                                                        max_new_tokens=self.max_new_tokens))
            return list(rollout.texts)
        with concurrent.futures.ThreadPoolExecutor(min(self.max_workers, len(chats))) as pool:
            return list(pool.map(self._request, chats))

    def _request(self, chat: list[dict[str, str]]) -> str:
        """One chat completion from the endpoint; an unreachable endpoint or an unreadable reply gives ``""``
        (a failed verdict, -1) after the error is kept in ``self.errors``."""
        body = json.dumps({"model": self.model if isinstance(self.model, str) else "judge", "messages": chat,
                           "max_tokens": self.max_new_tokens, "temperature": 0.0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.base_url.rstrip("/") + "/chat/completions", data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read())
            return str(reply["choices"][0]["message"]["content"] or "")
        except (urllib.error.URLError, OSError, KeyError, IndexError, TypeError, ValueError) as err:
            self.errors.append(f"{type(err).__name__}: {err}")
            return ""


class OpenAIPairwiseJudge(LLMPairwiseJudge):
    """TRL's ``OpenAIPairwiseJudge(model, system_prompt=None, max_requests=1000)`` on any OpenAI-compatible
    endpoint (``base_url``, default OpenAI's; ``api_key`` given explicitly). ``max_requests`` caps the
    requests made over the judge's life; pairs beyond it get -1."""

    def __init__(self, model: str = "gpt-4-turbo-preview", system_prompt: str | None = None,
                 max_requests: int | None = 1000, *, base_url: str = "https://api.openai.com/v1",
                 api_key: str | None = None, **kwargs: Any) -> None:
        super().__init__(model, base_url=base_url, system_prompt=system_prompt, api_key=api_key, **kwargs)
        self.max_requests, self.num_requests = max_requests, 0

    def complete(self, chats: Sequence[list[dict[str, str]]]) -> list[str]:
        budget = len(chats) if self.max_requests is None else max(0, self.max_requests - self.num_requests)
        self.num_requests += min(budget, len(chats))
        return super().complete(chats[:budget]) + [""] * (len(chats) - min(budget, len(chats)))
