"""The built-in verifiable task: multi-digit addition (and subtraction) solved column by column.

Why this task: its answers are checkable exactly, every intermediate step is checkable on its own,
and a tiny model learns it on a CPU in minutes, so every method family (SFT, preferences, reward and
process-reward models, online RL) can be shown to *learn* something in tests and the quickstart.

A worked solution, right to left, one step per column, then the answer::

    What is 47 + 85?
    7+5+0=12, write 2 carry 1. 4+8+1=13, write 3 carry 1. <answer>132</answer>

    What is 85 - 47?
    15-7-0=8, write 8 borrow 1. 08-4-1=3, write 3 borrow 0. <answer>38</answer>

Each step states its own arithmetic: an addition step ``x+y+c=ss, write s%10 carry s//10.`` (incoming
carry ``c`` always written, sum always two digits); a subtraction step ``tt-y-c=d, write d borrow b.``
where ``tt`` is the top digit, plus ten exactly when ``b`` is 1, always two digits. So a wrong step is
wrong on its face, and every step of a problem has the same length: a step's digits sit at fixed
offsets from the question's, which a tiny transformer learns to look up far more easily than offsets
that drift with each optional ``+1`` or one-digit sum. The final carry becomes the answer's leading digit.

Wrong solutions (preference, unpaired and stepwise rows) come in two kinds, `errors=`:
- ``"sum"`` (default): one column's sum is off by 1 or 2 (``7+5+0=13, write 3 carry 1.``). Checking it takes
  the one-digit addition table, which a tiny model trained only to *classify* steps does not learn in a test
  budget; language-model likelihoods (DPO and its kin) see it at once.
- ``"carry"``: one column drops or invents its carry (borrow): the sum is right but the carry stated
  disagrees with it (``7+5+0=12, write 2 carry 0.``), and the next columns add the wrong carry. The slip sits
  in one step and is visible by comparing two digits of that step, which is what a reward or process
  reward model on the task can learn in minutes.
In both, a wrong final answer with every column right is the third kind of mistake.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Sequence

import datasets

from ..data.messages import completion_text

__all__ = [
    "ERROR_KINDS",
    "ArithmeticTask",
    "Problem",
    "Solution",
    "accuracy_reward",
    "check_step",
    "extract_answer",
    "format_reward",
    "solve",
]

ERROR_KINDS = ("sum", "carry")
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ADD_STEP = re.compile(r"^(\d)\+(\d)\+([01])=(\d\d), write (\d) carry (\d)\.$")
_SUB_STEP = re.compile(r"^(\d\d)-(\d)-([01])=(\d+), write (\d) borrow (\d)\.$")
_FORMAT_RE = re.compile(
    r"^\s*(?:(?:\d\+\d\+[01]=\d\d, write \d carry \d\.|\d\d-\d-[01]=\d+, write \d borrow \d\.)\s+)*"
    r"<answer>-?\d+</answer>\s*$"
)


@dataclass(frozen=True)
class Problem:
    """`a op b` with `op` in {"+", "-"}; subtraction problems have `a >= b`."""

    a: int
    b: int
    op: str = "+"

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def question(self) -> str:
        return f"What is {self.a} {self.op} {self.b}?"


@dataclass(frozen=True)
class Solution:
    """A worked solution: `steps` (one per column, then the `<answer>` step), the stated answer,
    and `error_step`, the index of the first wrong step (None when the solution is correct)."""

    steps: tuple[str, ...]
    answer: str
    error_step: int | None = None

    @property
    def text(self) -> str:
        return " ".join(self.steps)

    @property
    def correct(self) -> bool:
        return self.error_step is None


def _wrong(true: int, lo: int, hi: int, rng: random.Random) -> int:
    """A nearby wrong value in [lo, hi]; off by 1 or 2, so its last digit differs from the true one."""
    options = [true + d for d in (-2, -1, 1, 2) if lo <= true + d <= hi]
    return rng.choice(options)


def solve(problem: Problem, error_step: int | None = None, rng: random.Random | None = None,
          error_kind: str = "sum") -> Solution:
    """Column-by-column solution of `problem`.

    With `error_step = k` the k-th step goes wrong (the steps after it compute correctly from what it
    stated, so the error propagates into a wrong answer): with ``error_kind="sum"`` its sum is off by 1 or 2,
    with ``"carry"`` its carry (borrow) is flipped; a borrow out of the last column never reaches the answer,
    so there a "carry" error is a sum error. `k == number of columns` keeps every column right but states a
    wrong final answer.
    """
    if error_kind not in ERROR_KINDS:
        raise ValueError(f"error_kind must be one of {ERROR_KINDS}, got {error_kind!r}")
    rng = rng or random.Random(0)
    xs, ys = str(problem.a)[::-1], str(problem.b)[::-1]
    ncols = max(len(xs), len(ys))
    if error_step is not None and not 0 <= error_step <= ncols:
        raise ValueError(f"error_step must be in [0, {ncols}], got {error_step}")
    steps, digits, carry = [], [], 0
    for k in range(ncols):
        x = int(xs[k]) if k < len(xs) else 0
        y = int(ys[k]) if k < len(ys) else 0
        slip = k == error_step and error_kind == "carry"
        if problem.op == "+":
            s = x + y + carry
            if k == error_step and not slip:
                s = _wrong(s, 0, 19, rng)
            out = 1 - s // 10 if slip else s // 10
            steps.append(f"{x}+{y}+{carry}={s:02d}, write {s % 10} carry {out}.")
            digits.append(s % 10)
            carry = out
        else:
            borrow = int(x - carry < y)
            d = 10 * borrow + x - y - carry
            slip = slip and k < ncols - 1
            if k == error_step and not slip:
                d = _wrong(d, 0, 9, rng)
            out = 1 - borrow if slip else borrow
            steps.append(f"{10 * borrow + x:02d}-{y}-{carry}={d}, write {d} borrow {out}.")
            digits.append(d)
            carry = out
    if problem.op == "+" and carry:
        digits.append(carry)
    stated = int("".join(str(d) for d in reversed(digits)))
    if error_step == ncols:
        stated = problem.answer + rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if problem.answer + d >= 0])
    steps.append(f"<answer>{stated}</answer>")
    wrong = stated != problem.answer
    if (error_step is not None) != wrong:
        raise AssertionError(f"internal error: error_step={error_step} but stated answer {stated} for {problem}")
    return Solution(tuple(steps), str(stated), error_step)


def check_step(step: str) -> bool | None:
    """True/False for a column step whose arithmetic is right/wrong; None when `step` is not a column step."""
    step = step.strip()
    m = _ADD_STEP.match(step)
    if m:
        s = int(m[1]) + int(m[2]) + int(m[3])
        return int(m[4]) == s and int(m[5]) == s % 10 and int(m[6]) == s // 10
    m = _SUB_STEP.match(step)
    if m:
        top = int(m[1])
        d = top - int(m[2]) - int(m[3])
        return top < 20 and 0 <= d <= 9 and int(m[4]) == d and int(m[5]) == d and int(m[6]) == int(top >= 10)
    return None


def extract_answer(text: Any) -> str | None:
    """Content of the last `<answer>...</answer>` (stripped), or None; accepts a string or messages."""
    found = _ANSWER_RE.findall(completion_text(text))
    return found[-1].strip() if found else None


def _normalize(value: Any) -> str:
    s = str(value).strip().replace(",", "").replace(" ", "").lstrip("+")
    try:
        return str(int(s))
    except ValueError:
        return s


def accuracy_reward(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any], **kwargs: Any
) -> list[float]:
    """1.0 when the completion's `<answer>` equals the true `answer` (as integers), else 0.0."""
    out = []
    for completion, gold in zip(completions, answer):
        got = extract_answer(completion)
        out.append(1.0 if got is not None and _normalize(got) == _normalize(gold) else 0.0)
    return out


def format_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 when the completion is column steps (zero or more) then one `<answer>integer</answer>`, else 0.0."""
    return [1.0 if _FORMAT_RE.match(completion_text(c)) and completion_text(c).count("<answer>") == 1 else 0.0 for c in completions]


class ArithmeticTask:
    """Generates arithmetic datasets in every format posttrain uses, each with an `answer` column.

    `digits`: operand length (both operands have exactly that many digits). `operations`: a subset of
    ("+", "-"). `conversational=True` gives message lists (with `system_prompt` first when set) instead
    of strings. Problems come from one seeded stream: `problems(n)` is always the same first n, so
    every format built with the same n covers the same problems; `split` takes the test problems from
    further down the stream, never repeating a train problem (a + b and b + a count as the same).
    `errors`: how the wrong solutions of the preference, unpaired and stepwise rows go wrong, "sum" or
    "carry" (see the module docstring).
    """

    def __init__(self, digits: int = 2, seed: int = 0, *, operations: Sequence[str] = ("+",),
                 conversational: bool = False, system_prompt: str | None = None, errors: str = "sum"):
        if errors not in ERROR_KINDS:
            raise ValueError(f"errors must be one of {ERROR_KINDS}, got {errors!r}")
        if digits < 1:
            raise ValueError(f"digits must be >= 1, got {digits}")
        if not operations or any(op not in ("+", "-") for op in operations):
            raise ValueError(f"operations must be a non-empty subset of ('+', '-'), got {operations!r}")
        self.digits, self.seed, self.operations = digits, seed, tuple(operations)
        self.conversational, self.system_prompt, self.errors = conversational, system_prompt, errors

    # ---- problems -------------------------------------------------------------------------------
    def _key(self, p: Problem) -> tuple:
        return (p.op, min(p.a, p.b), max(p.a, p.b)) if p.op == "+" else (p.op, p.a, p.b)

    def num_problems(self) -> int:
        """How many distinct problems exist at this difficulty."""
        n = 10**self.digits - (10 ** (self.digits - 1) if self.digits > 1 else 0)
        return len(self.operations) * n * (n + 1) // 2

    def problems(self, n: int) -> list[Problem]:
        """The first `n` distinct problems of this task's seeded stream."""
        total = self.num_problems()
        if n > total:
            raise ValueError(f"asked for {n} distinct problems but {self.digits}-digit {'/'.join(self.operations)} "
                             f"has only {total}; use more digits")
        rng = random.Random(f"arithmetic:{self.digits}:{''.join(self.operations)}:{self.seed}")
        lo, hi = (10 ** (self.digits - 1) if self.digits > 1 else 0), 10**self.digits - 1
        seen: set[tuple] = set()
        out: list[Problem] = []
        while len(out) < n:
            if len(seen) > total // 2:  # dense: enumerate what is left instead of rejection sampling
                rest = [Problem(a, b, op) for op in self.operations for a in range(lo, hi + 1)
                        for b in range(lo, a + 1) if (op, b, a) not in seen and (op, a, b) not in seen]
                rng.shuffle(rest)
                out.extend(rest[: n - len(out)])
                break
            a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(self.operations)
            if op == "-" and b > a:
                a, b = b, a
            p = Problem(a, b, op)
            if self._key(p) not in seen:
                seen.add(self._key(p))
                out.append(p)
        return out

    # ---- rendering ------------------------------------------------------------------------------
    def _prompt(self, p: Problem) -> Any:
        if not self.conversational:
            return p.question + "\n"
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": p.question}]

    def _completion(self, text: str) -> Any:
        return [{"role": "assistant", "content": text}] if self.conversational else text

    def _rng(self, kind: str) -> random.Random:
        return random.Random(f"arithmetic-rows:{kind}:{self.digits}:{self.seed}")

    def _wrong_solution(self, p: Problem, nsteps: int, rng: random.Random) -> Solution:
        return solve(p, error_step=rng.randrange(nsteps), rng=rng, error_kind=self.errors)

    def _rows(self, kind: str, problems: Sequence[Problem], implicit_prompt: bool = False,
              answer_only: float = 0.0) -> datasets.Dataset:
        if not 0.0 <= answer_only <= 1.0:
            raise ValueError(f"answer_only must be a fraction in [0, 1], got {answer_only}")
        rng = self._rng(kind)
        rows: list[dict[str, Any]] = []
        for p in problems:
            good = solve(p)
            row: dict[str, Any] = {}
            prompt = self._prompt(p)
            if kind == "language_modeling":
                if self.conversational:
                    row["messages"] = prompt + self._completion(good.text)
                else:
                    row["text"] = prompt + good.text
            elif kind == "prompt_only":
                row["prompt"] = prompt
            elif kind == "prompt_completion":
                short = answer_only > 0 and rng.random() < answer_only
                row.update(prompt=prompt, completion=self._completion(good.steps[-1] if short else good.text))
            elif kind == "preference":
                bad = self._wrong_solution(p, len(good.steps), rng)
                chosen, rejected = self._completion(good.text), self._completion(bad.text)
                if implicit_prompt:
                    row.update(chosen=prompt + chosen, rejected=prompt + rejected)
                else:
                    row.update(prompt=prompt, chosen=chosen, rejected=rejected)
            elif kind == "unpaired_preference":
                label = rng.random() < 0.5
                sol = good if label else self._wrong_solution(p, len(good.steps), rng)
                row.update(prompt=prompt, completion=self._completion(sol.text), label=label)
            elif kind == "stepwise":
                sol = good if rng.random() < 0.5 else self._wrong_solution(p, len(good.steps), rng)
                first_bad = len(sol.steps) if sol.error_step is None else sol.error_step
                row.update(prompt=prompt, completions=list(sol.steps),
                           labels=[i < first_bad for i in range(len(sol.steps))])
            else:
                raise ValueError(f"unknown dataset kind {kind!r}")
            row["answer"] = str(p.answer)
            rows.append(row)
        return datasets.Dataset.from_list(rows)

    # ---- datasets -------------------------------------------------------------------------------
    def language_modeling(self, n: int) -> datasets.Dataset:
        """`text` (question + worked solution) or `messages`; plus `answer`."""
        return self._rows("language_modeling", self.problems(n))

    def prompt_only(self, n: int) -> datasets.Dataset:
        """`prompt`, `answer`: for online RL and evaluation."""
        return self._rows("prompt_only", self.problems(n))

    def prompt_completion(self, n: int, answer_only: float = 0.0) -> datasets.Dataset:
        """`prompt`, `completion` (the correct worked solution), `answer`: for SFT and distillation.
        `answer_only`: the share of rows (seeded) whose completion is only the `<answer>` step, no worked
        columns: a demonstrator that often skips its reasoning, as much real data does."""
        return self._rows("prompt_completion", self.problems(n), answer_only=answer_only)

    def preference(self, n: int, implicit_prompt: bool = False) -> datasets.Dataset:
        """`prompt`, `chosen` (correct), `rejected` (one wrong step that propagates, or a wrong final
        answer), `answer`. `implicit_prompt=True` drops `prompt` and prefixes it to chosen/rejected."""
        return self._rows("preference", self.problems(n), implicit_prompt=implicit_prompt)

    def unpaired_preference(self, n: int) -> datasets.Dataset:
        """`prompt`, `completion`, `label` (True for a correct solution, about half), `answer`."""
        return self._rows("unpaired_preference", self.problems(n))

    def stepwise(self, n: int) -> datasets.Dataset:
        """`prompt`, `completions` (the steps, the last one the `<answer>`), `labels`, `answer`.
        About half the rows have an error at a random step; a step is True iff it and all before it are right."""
        return self._rows("stepwise", self.problems(n))

    def split(self, n_train: int, n_test: int, train_format: str = "prompt_completion",
              test_format: str = "prompt_only", **kwargs: Any) -> datasets.DatasetDict:
        """`DatasetDict(train=..., test=...)` over disjoint problems, e.g. SFT data and held-out prompts.
        The train problems are `problems(n_train)`; `kwargs` (e.g. implicit_prompt) go to the train format."""
        problems = self.problems(n_train + n_test)
        return datasets.DatasetDict(
            train=self._rows(train_format, problems[:n_train], **kwargs),
            test=self._rows(test_format, problems[n_train:]),
        )
