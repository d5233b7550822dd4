"""A trained reward model (outcome or process) as a reward function for the online methods.

`RewardModelScorer` wraps a sequence-classification model (outcome reward model, one score) or a
token-classification model (process reward model, 2 labels read at step separators) together with its own
tokenizer and chat template, and follows the reward contract of docs/internals.md:

    scorer(prompts, completions, completion_ids=None, **columns) -> list[float]

Conversational prompts and completions are rendered through the *reward model's* chat template, whatever
the policy's is. Inputs are encoded by `posttrain.online.rewards.inputs`, the same functions the reward
trainers tokenize their data with, so a reward model scores at inference exactly what it was trained on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ...data import ensure_chat_template
from ...data.messages import completion_text
from ...losses.prm import AGGREGATIONS, aggregate_step_scores, step_logits
from .inputs import encode_outcome, encode_steps, pad_right, split_steps

__all__ = ["RewardModelScorer", "saved_kind", "score_outcomes", "score_steps", "score_steps_batch"]

KINDS = ("outcome", "process")


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class _EvalMode:
    """Run a model in eval mode (no dropout) and restore its previous mode afterwards."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        self.model.train(self.was_training)


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else pad


@torch.no_grad()
def score_outcomes(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
) -> list[float]:
    """Scalar rewards of (prompt, completion) pairs from a one-score sequence-classification model."""
    encoded = [encode_outcome(tokenizer, p, c, max_length=max_length)["input_ids"] for p, c in zip(prompts, completions)]
    scores: list[float] = []
    with _EvalMode(model):
        for start in range(0, len(encoded), batch_size):
            input_ids, attention_mask = pad_right(encoded[start : start + batch_size], _pad_id(tokenizer))
            device = _device(model)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            scores.extend(logits[:, 0].float().cpu().tolist())
    return scores


@torch.no_grad()
def score_steps_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any],
    solutions: Sequence[Sequence[str]],
    *,
    separator: str = "\n",
    batch_size: int = 16,
    max_length: int | None = None,
) -> list[list[float]]:
    """Per-step correctness probabilities of many stepwise solutions (one list per solution).

    Steps cut off by `max_length` get no score (their list is shorter than the solution).
    """
    encoded = [
        encode_steps(tokenizer, p, steps, separator=separator, max_length=max_length)
        for p, steps in zip(prompts, solutions)
    ]
    out: list[list[float]] = []
    with _EvalMode(model):
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            input_ids, attention_mask = pad_right([e["input_ids"] for e in chunk], _pad_id(tokenizer))
            device = _device(model)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            probs = torch.sigmoid(step_logits(logits.float())).cpu()
            out.extend(probs[i, e["step_positions"]].tolist() for i, e in enumerate(chunk))
    return out


def score_steps(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: Any,
    steps: Sequence[str],
    *,
    separator: str = "\n",
    max_length: int | None = None,
) -> list[float]:
    """The probability that each step of one solution is correct, from a process reward model."""
    return score_steps_batch(model, tokenizer, [prompt], [list(steps)], separator=separator, max_length=max_length)[0]


def _kind_of_model(model: torch.nn.Module) -> str | None:
    """``"process"`` for a token-classification model, ``"outcome"`` for a sequence-classification one."""
    from ...models import unwrap_model

    return _kind_of_architecture(type(unwrap_model(model)).__name__)


def _kind_of_architecture(name: str) -> str | None:
    if name.endswith("ForTokenClassification"):
        return "process"
    if name.endswith("ForSequenceClassification"):
        return "outcome"
    return None


def saved_kind(source: str) -> str | None:
    """The kind of reward model a folder holds, from the architecture its saved config names (a folder
    written by `PRMTrainer` is a token classifier: ``"process"``); None when the config names neither head
    (a causal LM, a ``tiny:`` spec) or cannot be read."""
    if source.startswith("tiny:"):
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError):
        return None
    kinds = {_kind_of_architecture(a) for a in (getattr(config, "architectures", None) or [])} - {None}
    return kinds.pop() if len(kinds) == 1 else None


class RewardModelScorer:
    """A reward model as a batched reward function.

    Args:
        model_or_path: a loaded model, or a folder written by `save_pretrained` (or `tiny:<spec>`), loaded
            with a one-score sequence-classification head (``kind="outcome"``) or a 2-label
            token-classification head (``kind="process"``). ``path=`` is the same (the YAML spelling:
            ``{name: posttrain.online.reward_model.RewardModelScorer, kind: process, path: ...}``).
        tokenizer: the reward model's tokenizer; default: loaded from `model_or_path` (a path), or from the
            model's ``name_or_path``.
        kind: ``"outcome"`` (one score per completion) or ``"process"`` (the completion is split into steps
            at `step_separator`, each step scored, the step scores reduced with `aggregate`). Default: what
            the model is (a token classifier, such as a folder saved by `PRMTrainer`, is a process model;
            anything else an outcome model). A kind that contradicts the model is an error.
        batch_size: sequences per forward pass.
        aggregate: ``"min"``, ``"product"``, ``"last"`` or ``"mean"`` (process only; see
            `posttrain.losses.aggregate_step_scores`).
        step_separator: what separates steps (process only). Default: the one the PRM was trained with (saved
            in its config by `PRMTrainer`), else ``"\n"``.
        max_length: truncate inputs as the trainers do (None: no truncation).
        chat_template: a template name or Jinja string for the reward tokenizer; default: its own, else chatml.
        name: the name under which its rewards are logged; default: the model folder's name.
    """

    def __init__(
        self,
        model_or_path: str | os.PathLike | torch.nn.Module | None = None,
        tokenizer: Any = None,
        kind: str | None = None,
        batch_size: int = 16,
        aggregate: str = "min",
        step_separator: str | None = None,
        max_length: int | None = None,
        chat_template: str | None = None,
        name: str | None = None,
        device: str | torch.device | None = None,
        *,
        path: str | os.PathLike | None = None,
    ) -> None:
        if (model_or_path is None) == (path is None):
            raise ValueError("pass the reward model as model_or_path or as path (one of the two)")
        model_or_path = path if model_or_path is None else model_or_path
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if aggregate not in AGGREGATIONS and aggregate != "prod":
            raise ValueError(f"aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
        from ...models import load_model, load_tokenizer

        source = os.fspath(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else None
        found = saved_kind(source) if source is not None else _kind_of_model(model_or_path)
        if kind is not None and found is not None and kind != found:
            what = "a token classifier (a process reward model)" if found == "process" else \
                "a one-score sequence classifier (an outcome reward model)"
            raise ValueError(f"kind={kind!r}, but {source or type(model_or_path).__name__} is {what}; "
                             f"pass kind={found!r} or leave kind out")
        kind = kind or found or "outcome"
        if source is not None:
            task, labels = ("seq-cls", 1) if kind == "outcome" else ("token-cls", 2)
            model = load_model(source, task=task, num_labels=labels)
        else:
            model = model_or_path
        if step_separator is None:
            step_separator = getattr(getattr(model, "config", None), "step_separator", None) or "\n"
        if tokenizer is None:
            origin = source or getattr(getattr(model, "config", None), "_name_or_path", None)
            if not origin:
                raise ValueError("pass the reward model's tokenizer: the model object does not say where it came from")
            tokenizer = load_tokenizer(origin)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        ensure_chat_template(tokenizer, chat_template)
        # the head finds each row's last token through pad_token_id; it must be the id we pad with
        model.config.pad_token_id = _pad_id(tokenizer)
        if device is not None:
            model = model.to(device)
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind
        self.batch_size = batch_size
        self.aggregate = aggregate
        self.step_separator = step_separator
        self.max_length = max_length
        origin = source or getattr(model.config, "_name_or_path", "") or ""
        base = os.path.basename(str(origin).rstrip("/")) or ("prm" if kind == "process" else "reward_model")
        self.name = name or base
        self.__name__ = self.name  # the reward contract's logging name
        self.reward_name = self.name

    def __repr__(self) -> str:
        return f"RewardModelScorer(name={self.name!r}, kind={self.kind!r}, aggregate={self.aggregate!r})"

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None, **kwargs: Any
    ) -> list[float]:
        """One reward per completion. A process model splits each completion into steps at
        `step_separator` and reduces the step probabilities with `aggregate` (0.0 when truncation left
        no scored step)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        if self.kind == "outcome":
            return score_outcomes(
                self.model, self.tokenizer, list(prompts), list(completions),
                batch_size=self.batch_size, max_length=self.max_length,
            )
        solutions = [split_steps(completion_text(c), self.step_separator) for c in completions]
        per_step = self.score_steps_batch(list(prompts), solutions)
        return [aggregate_step_scores(s, self.aggregate) if s else 0.0 for s in per_step]

    def score(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
        """Same as calling the scorer (for code that expects a ``score`` method)."""
        return self(prompts, completions)

    def score_steps(self, prompt: Any, steps: Sequence[str]) -> list[float]:
        """Per-step correctness probabilities of one solution (process reward models only)."""
        return self.score_steps_batch([prompt], [list(steps)])[0]

    def score_steps_batch(self, prompts: Sequence[Any], solutions: Sequence[Sequence[str]]) -> list[list[float]]:
        if self.kind != "process":
            raise ValueError("score_steps needs a process reward model (kind='process')")
        return score_steps_batch(
            self.model, self.tokenizer, prompts, solutions,
            separator=self.step_separator, batch_size=self.batch_size, max_length=self.max_length,
        )
