"""Generic built-in reward functions: answer accuracy, format, soft overlong punishment, length, cosine-scaled
accuracy, repetition penalty.

Every function follows the reward contract ``f(prompts, completions, completion_ids, **columns) ->
list[float | None]``. A completion is a string, or for conversational prompts a list of messages whose
last one is the assistant's reply; `posttrain.data.messages.completion_text` gives the text either way.
The ``make_*`` factories build configured variants; `BUILTIN_REWARDS` maps the names usable from YAML to
factories; the built-in tasks' rewards (``arithmetic``, ...) live in `posttrain.tasks.rewards` and resolve
by name through `builtin_factory` too.
`TRL_CLI_REWARDS` maps the reward names TRL 1.16's `trl grpo`/`trl rloo` accept to the configured built-in
that computes the same reward (`make_trl_cli_reward`), so those command lines work unchanged.
"""

from __future__ import annotations

import math
import re
import threading
from typing import Any, Callable, Sequence

from ...data.messages import completion_text

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


def extract_tag(text: str, tag: str) -> str | None:
    """Content of the last ``<tag>...</tag>`` in ``text``, stripped; ``None`` when absent."""
    found = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
    return found[-1].strip() if found else None


def _normalize(text: str) -> str:
    text = text.strip().strip("$").strip()
    boxed = re.search(r"\\boxed\{(.*)\}", text)
    if boxed:
        text = boxed.group(1)
    text = text.rstrip(".").strip()
    return re.sub(r"\s+", " ", text).lower()


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def answers_match_fallback(answer: str, gold: str, *, tagged: bool) -> bool:
    """Equivalence without math-verify: equal numbers (relative 1e-6), else equal normalized strings.

    An untagged answer is reduced to its last number when the gold answer is a number.
    """
    gold_n, ans_n = _normalize(gold), _normalize(answer)
    gold_num = _as_number(gold_n)
    if gold_num is not None:
        if not tagged:
            numbers = _NUMBER.findall(ans_n)
            ans_n = numbers[-1] if numbers else ans_n
        ans_num = _as_number(ans_n)
        if ans_num is not None:
            return math.isclose(ans_num, gold_num, rel_tol=1e-6, abs_tol=1e-9)
    return ans_n == gold_n


def _math_verify_match(answer: str, gold: str, latex_only: bool = False) -> bool | None:
    """math-verify's judgement, ``None`` when it is not installed or cannot parse the gold answer.

    ``latex_only``: the answer is read only from LaTeX (``\\boxed{}`` first, then ``$...$``; the first match,
    units normalized), and the gold answer as written: how TRL's ``accuracy_reward`` reads them.
    """
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    # math-verify's timeouts use signal.alarm, which only works in the main thread
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(gold, parsing_timeout=timeout)
    if not gold_parsed and not latex_only:
        gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
    if not gold_parsed:
        return None
    if latex_only:
        from latex2sympy2_extended import NormalizationConfig
        from math_verify import LatexExtractionConfig

        extraction = LatexExtractionConfig(normalization_config=NormalizationConfig(units=True),
                                           boxed_match_priority=0, try_extract_without_anchor=False)
        answer_parsed = parse(answer, extraction_config=[extraction], extraction_mode="first_match",
                              parsing_timeout=timeout)
    else:
        answer_parsed = parse(answer, parsing_timeout=timeout)
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=timeout))


def make_accuracy_reward(answer_tag: str | None = "answer", use_math_verify: bool = True, latex_only: bool = False,
                         answer_after: str | None = None) -> Callable:
    """Answer accuracy: 1.0 when the completion's answer equals the gold answer, else 0.0.

    The gold answer is the dataset column ``solution`` or ``answer``. The completion's answer is the
    content of its last ``<answer_tag>`` element when present, else the whole completion. Equivalence is
    checked by math-verify (``parse`` + ``verify``: LaTeX, fractions, sets, units) when installed, else
    by `answers_match_fallback`. ``None`` (not applicable) when the row has no gold answer.

    ``answer_after`` (e.g. ``"</think>"``): only the text after its last occurrence is the answer, and a
    completion without it scores 0.0 (its reasoning never ended). ``latex_only``: TRL's reading, the answer
    only from LaTeX (``\\boxed{}`` first, then ``$...$``) and ``None`` when math-verify cannot parse the gold
    answer (no fallback comparison); it needs math-verify.
    """
    if latex_only:
        try:
            import math_verify  # noqa: F401
        except ImportError:
            raise ImportError("the accuracy reward with latex_only=True (TRL's accuracy_reward) needs math-verify: "
                              "pip install 'posttrain[math]'") from None

    def accuracy(prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                 solution: Sequence[Any] | None = None, answer: Sequence[Any] | None = None,
                 **kwargs: Any) -> list[float | None]:
        golds = solution if solution is not None else answer
        if golds is None:
            raise KeyError("the accuracy reward needs a 'solution' or 'answer' dataset column")
        out: list[float | None] = []
        for completion, gold in zip(completions, golds):
            text = completion_text(completion)
            if answer_after is not None:
                if answer_after not in text:
                    out.append(0.0)
                    continue
                text = text.rsplit(answer_after, 1)[1]
            if gold is None or str(gold).strip() == "":
                out.append(None)
                continue
            tagged = extract_tag(text, answer_tag) if answer_tag else None
            candidate = tagged if tagged is not None else text
            if latex_only:
                verdict = _math_verify_match(candidate, str(gold), latex_only=True)
            else:
                verdict = _math_verify_match(candidate, str(gold)) if use_math_verify else None
            if verdict is None:
                if latex_only:
                    out.append(None)
                    continue
                verdict = answers_match_fallback(candidate, str(gold), tagged=tagged is not None)
            out.append(1.0 if verdict else 0.0)
        return out

    return accuracy


def make_format_reward(
    answer_tag: str = "answer", think_tag: str | None = "think", require_think: bool = False, strict: bool = True
) -> Callable:
    """Format reward: 1.0 when the completion has the expected tags, else 0.0.

    Strict (default): the whole completion is ``[<think>...</think>] <answer>...</answer>`` (whitespace
    around the parts allowed; the reasoning part is required when ``require_think``). Non-strict: an
    ``<answer>...</answer>`` element (and a ``<think>`` element when required) appears somewhere.
    """
    a = re.escape(answer_tag)
    think = rf"<{re.escape(think_tag)}>.*?</{re.escape(think_tag)}>" if think_tag else None
    if require_think and think is None:
        raise ValueError("require_think needs a think_tag")
    answer_part = rf"<{a}>.*?</{a}>"
    if strict:
        prefix = "" if think is None else (rf"{think}\s*" if require_think else rf"(?:{think}\s*)?")
        pattern = re.compile(rf"^\s*{prefix}{answer_part}\s*$", re.DOTALL)
    else:
        pattern = re.compile(answer_part if not require_think else rf"{think}.*?{answer_part}", re.DOTALL)

    def format_reward(prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                      **kwargs: Any) -> list[float | None]:
        match = pattern.match if strict else pattern.search
        return [1.0 if match(completion_text(c)) else 0.0 for c in completions]

    return format_reward


def make_think_format_reward(think_tag: str = "think") -> Callable:
    """Reasoning-format reward: 1.0 when the completion starts with ``<think>``, opens it only once, and closes
    it (``</think>``) later; whatever follows is free. Else 0.0. (TRL's ``think_format_reward``.)"""
    open_tag, close_tag = f"<{think_tag}>", f"</{think_tag}>"

    def think_format(prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                     **kwargs: Any) -> list[float | None]:
        out: list[float | None] = []
        for completion in completions:
            text = completion_text(completion)
            ok = text.startswith(open_tag) and text.count(open_tag) == 1 and close_tag in text[len(open_tag):]
            out.append(1.0 if ok else 0.0)
        return out

    return think_format


def make_soft_overlong_reward(max_completion_length: int, overlong_buffer: int | None = None) -> Callable:
    """DAPO's soft overlong punishment on the completion's token count ``L`` (Yu et al. 2025)::

        R(L) = 0                              if L <= L_max - L_buf
             = (L_max - L_buf - L) / L_buf    if L_max - L_buf < L <= L_max
             = -1                             if L > L_max

    ``L_max = max_completion_length``; ``L_buf = overlong_buffer`` (default ``L_max // 4``). Meant to be
    added to a correctness reward, so long answers lose reward smoothly before being truncated.
    """
    buf = max(1, max_completion_length // 4) if overlong_buffer is None else overlong_buffer
    if not 0 < buf <= max_completion_length:
        raise ValueError(f"overlong_buffer must be in (0, {max_completion_length}], got {buf}")
    start = max_completion_length - buf

    def soft_overlong(prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]],
                      **kwargs: Any) -> list[float | None]:
        out = []
        for ids in completion_ids:
            n = len(ids)
            out.append(0.0 if n <= start else (-1.0 if n > max_completion_length else (start - n) / buf))
        return out

    return soft_overlong


def make_length_reward(target_length: int | None = None, max_completion_length: int | None = None) -> Callable:
    """Length reward on the completion's token count ``L``.

    With ``target_length``: ``-|L - target| / target`` (0 at the target, lower further away). Without:
    ``-L / max_completion_length``, a brevity bonus in ``[-1, 0]``.
    """
    if target_length is None and not max_completion_length:
        raise ValueError("the length reward needs target_length or max_completion_length")

    def length(prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]],
               **kwargs: Any) -> list[float | None]:
        if target_length is not None:
            return [-abs(len(ids) - target_length) / max(target_length, 1) for ids in completion_ids]
        return [-len(ids) / max_completion_length for ids in completion_ids]

    return length


def make_cosine_scaled_reward(max_len: int | None = None, min_value_wrong: float = -1.0,
                              max_value_wrong: float = -0.5, min_value_correct: float = 0.5,
                              max_value_correct: float = 1.0, accuracy: Callable | None = None,
                              max_completion_length: int | None = None) -> Callable:
    """Correctness scaled by length on a cosine schedule, favouring short right answers (Yeo et al. 2025,
    "Demystifying Long Chain-of-Thought Reasoning in LLMs", appendix C.1)::

        R(L) = v_lo + (v_hi - v_lo) * (1 + cos(pi * min(L / max_len, 1))) / 2

    ``(v_lo, v_hi) = (min_value_correct, max_value_correct)`` for a right answer (shorter scores more) and
    ``(max_value_wrong, min_value_wrong)`` for a wrong one (shorter is penalized more, so exploring longer is not);
    ``L`` is the completion's token count, capped at ``max_len`` (the cosine would climb again past it).
    Correctness comes from ``accuracy`` (default: TRL's math-verify reading of `make_accuracy_reward`); a row it
    cannot judge (``None``) stays ``None``. ``max_len`` defaults to the run's ``max_completion_length`` (the
    built-in name ``cosine_scaled``)."""
    max_len = max_len if max_len is not None else max_completion_length
    if not max_len or max_len <= 0:
        raise ValueError(f"the cosine-scaled reward needs a positive max_len, got {max_len}")
    judge = accuracy or make_accuracy_reward(answer_tag=None, latex_only=True)

    def cosine_scaled(prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]],
                      **kwargs: Any) -> list[float | None]:
        out: list[float | None] = []
        for right, ids in zip(judge(prompts, completions, completion_ids, **kwargs), completion_ids):
            if right is None:
                out.append(None)
                continue
            lo, hi = (min_value_correct, max_value_correct) if right else (max_value_wrong, min_value_wrong)
            progress = min(len(ids) / max_len, 1.0)
            out.append(float(lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * progress))))
        return out

    return cosine_scaled


def make_repetition_penalty_reward(ngram_size: int = 3, max_penalty: float = -1.0) -> Callable:
    """Penalty for repeated token n-grams (Yeo et al. 2025, appendix C.2): ``(1 - unique / total) * max_penalty``
    over the completion's ``ngram_size``-grams of token ids, so 0 without repeats and near ``max_penalty`` for a
    completion that repeats itself; 0 for a completion shorter than ``ngram_size``."""
    if max_penalty > 0:
        raise ValueError(f"max_penalty must not be positive, got {max_penalty}")
    if ngram_size < 1:
        raise ValueError(f"ngram_size must be at least 1, got {ngram_size}")

    def repetition_penalty(prompts: Sequence[Any], completions: Sequence[Any],
                           completion_ids: Sequence[Sequence[int]], **kwargs: Any) -> list[float | None]:
        out: list[float | None] = []
        for ids in completion_ids:
            ids = list(ids)
            if len(ids) < ngram_size:
                out.append(0.0)
                continue
            grams = [tuple(ids[i:i + ngram_size]) for i in range(len(ids) - ngram_size + 1)]
            out.append((1.0 - len(set(grams)) / len(grams)) * max_penalty)
        return out

    return repetition_penalty


BUILTIN_REWARDS: dict[str, Callable[..., Callable]] = {
    "accuracy": make_accuracy_reward,
    "format": make_format_reward,
    "think_format": make_think_format_reward,
    "soft_overlong": make_soft_overlong_reward,
    "length": make_length_reward,
    "cosine_scaled": make_cosine_scaled_reward,
    "repetition_penalty": make_repetition_penalty_reward,
}


def builtin_factory(name: str) -> Callable[..., Callable] | None:
    """The factory of a built-in reward name: a generic one here, or a built-in task's (`posttrain.tasks.rewards`,
    e.g. ``arithmetic``); ``None`` for an unknown name."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    from ...tasks.rewards import TASK_REWARDS  # the tasks' own rewards, imported when a name asks for them

    return TASK_REWARDS.get(name)


# TRL CLI name -> (built-in, its options, the name TRL logs its metrics under). TRL's CLI fixes the soft
# overlong punishment at max_completion_len=1280, soft_punish_cache=256 whatever the run's completion length.
TRL_CLI_REWARDS: dict[str, tuple[str, dict[str, Any], str]] = {
    "accuracy_reward": ("accuracy", {"answer_tag": None, "latex_only": True}, "accuracy_reward"),
    "reasoning_accuracy_reward": (
        "accuracy", {"answer_tag": None, "latex_only": True, "answer_after": "</think>"}, "reasoning_accuracy_reward"),
    "think_format_reward": ("think_format", {}, "think_format_reward"),
    "get_soft_overlong_punishment": (
        "soft_overlong", {"max_completion_length": 1280, "overlong_buffer": 256}, "soft_overlong_punishment_reward"),
}


def make_trl_cli_reward(name: str) -> Callable:
    """The reward TRL 1.16's command line means by `name` (`accuracy_reward`, `reasoning_accuracy_reward`,
    `think_format_reward`, `get_soft_overlong_punishment`), as the configured built-in that computes it,
    named as TRL names its metrics (``rewards/<name>/mean``)."""
    if name not in TRL_CLI_REWARDS:
        raise KeyError(f"{name!r} is not a reward name of TRL's command line; those are {sorted(TRL_CLI_REWARDS)}")
    builtin, options, metric_name = TRL_CLI_REWARDS[name]
    func = BUILTIN_REWARDS[builtin](**options)
    func.__name__ = metric_name
    return func


def builtin_names() -> Sequence[str]:
    """Every built-in reward name, the generic ones and the built-in tasks'."""
    from ...tasks.rewards import TASK_REWARDS

    return sorted({**BUILTIN_REWARDS, **TASK_REWARDS})
