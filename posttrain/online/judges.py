"""Judges for the online preference methods (Online DPO, Nash-MD, XPO): which of two completions is better.

The contracts are TRL's, so a judge written for TRL works here unchanged:

- `BasePairwiseJudge.judge(prompts, completions, shuffle_order=True) -> list[int]`: ``completions[i]`` is a
  pair ``[a, b]``; the answer is the index (0 or 1) of the better one, ``-1`` for a tie or a failed verdict.
  Judges that can say how sure they are also take ``return_scores=True`` and return the probability that
  ``a`` is the better one.
- `BaseRankJudge.judge(prompts, completions, shuffle_order=True) -> list[list[int]]`: the candidates of each
  prompt ordered best first (indices into ``completions[i]``).
- `BaseBinaryJudge.judge(prompts, completions, gold_completions=None, shuffle_order=True) -> list[int]`:
  1 (the completion meets the constraint), 0 (it does not) or -1 (could not tell); `AllTrueJudge` combines
  several: 1 only when every judge says 1, -1 when any judge failed.

Judges that work offline, with no hub access:

- `RewardFunctionJudge` (a rule judge): any reward function of the reward contract (a callable, a built-in
  name such as ``"arithmetic"``, an import path); the higher reward wins, equal rewards tie. Dataset columns
  the trainer passes (e.g. ``answer``) reach the function.
- `RewardModelJudge`: a sequence-classification model, a trained reward-model folder or ``tiny:`` spec
  (through `RewardModelScorer`, which encodes as the reward trainer did); the Bradley-Terry probability
  ``sigma(s_a - s_b)`` is its score.
- `LLMPairwiseJudge` (`posttrain.online.judge_llm`): prompts a chat model, in process or over an
  OpenAI-compatible HTTP endpoint, and parses its verdict.
- `PairRMJudge`: the PairRM ranker through the ``llm-blender`` package, where it is installed.

Position bias: with ``shuffle_order=True`` a judge that looks at the pair as a whole sees it in a random
order (seeded per judge) and maps its verdict back; score-based judges are order-free.
"""

from __future__ import annotations

import abc
import math
import random
from typing import Any, Sequence

import torch

from .rewards.compose import _accepted_kwargs

__all__ = ["BaseJudge", "BasePairwiseJudge", "BaseRankJudge", "BaseBinaryJudge", "AllTrueJudge",
           "ScorePairwiseJudge", "RewardFunctionJudge", "RewardModelJudge", "PairRMJudge", "call_judge",
           "judge_pairs"]


class BaseJudge(abc.ABC):
    """Anything that judges completions (the common base of TRL's judge classes)."""

    @abc.abstractmethod
    def judge(self, prompts: list[Any], completions: list[Any], shuffle_order: bool = True) -> list:
        """Judgments of ``completions`` for ``prompts``."""


class BaseRankJudge(abc.ABC):
    """Ranks the candidates of each prompt: ``judge(prompts, completions, shuffle_order=True)`` returns, per
    prompt, the candidate indices best first."""

    @abc.abstractmethod
    def judge(self, prompts: list[Any], completions: list[list[Any]], shuffle_order: bool = True) -> list[list[int]]:
        """Per prompt, the indices of ``completions[i]`` from best to worst."""


class BasePairwiseJudge(abc.ABC):
    """Picks the better completion of each pair: ``judge(prompts, completions, shuffle_order=True)`` returns
    0 or 1 per pair (``-1``: tie or failure)."""

    @abc.abstractmethod
    def judge(self, prompts: list[Any], completions: list[list[Any]], shuffle_order: bool = True) -> list[int]:
        """Per pair ``completions[i] = [a, b]``, the index of the better one, or -1."""


class BaseBinaryJudge(abc.ABC):
    """Says whether each completion meets a constraint: 1 yes, 0 no, -1 could not tell."""

    @abc.abstractmethod
    def judge(self, prompts: list[Any], completions: list[Any], gold_completions: list[Any] | None = None,
              shuffle_order: bool = True) -> list[int]:
        """Per completion, 1, 0 or -1."""


class AllTrueJudge(BaseBinaryJudge):
    """Several binary judges as one: 1 when every judge says 1, -1 when any judge could not tell, else 0."""

    def __init__(self, judges: Sequence[BaseBinaryJudge]) -> None:
        if not judges:
            raise ValueError("AllTrueJudge needs at least one binary judge")
        self.judges = list(judges)

    def judge(self, prompts: list[Any], completions: list[Any], gold_completions: list[Any] | None = None,
              shuffle_order: bool = True) -> list[int]:
        verdicts = [j.judge(prompts, completions, gold_completions, shuffle_order) for j in self.judges]
        out = []
        for i, row in enumerate(zip(*verdicts)):
            for k, v in enumerate(row):
                if v not in (0, 1, -1):
                    raise ValueError(f"binary judge {k} ({type(self.judges[k]).__name__}) returned {v!r} for "
                                     f"completion {i}; expected 1, 0 or -1")
            out.append(-1 if -1 in row else int(all(v == 1 for v in row)))
        return out


def _check_pairs(prompts: Sequence[Any], completions: Sequence[Sequence[Any]]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} pairs of completions")
    for i, pair in enumerate(completions):
        if len(pair) != 2:
            raise ValueError(f"pair {i} has {len(pair)} completions; a pairwise judge compares exactly 2")


class ScorePairwiseJudge(BasePairwiseJudge):
    """A pairwise judge from a pointwise score: the higher score wins, equal scores (within ``tie_margin``)
    tie. ``return_scores=True`` gives the Bradley-Terry probability ``sigma((s_a - s_b) / temperature)``
    that ``a`` is better. Subclasses implement `score`."""

    def __init__(self, tie_margin: float = 0.0) -> None:
        self.tie_margin = tie_margin

    @abc.abstractmethod
    def score(self, prompts: list[Any], completions: list[Any], **columns: list) -> list[float]:
        """One score per (prompt, completion); higher is better."""

    def judge(self, prompts: list[Any], completions: list[list[Any]], shuffle_order: bool = True,
              return_scores: bool = False, temperature: float = 1.0, **columns: list) -> list:
        _check_pairs(prompts, completions)
        n = len(prompts)
        flat_prompts = [p for p in prompts for _ in range(2)]
        flat = [c for pair in completions for c in pair]
        cols = {k: [v for v in vals for _ in range(2)] for k, vals in columns.items()}
        scores = self.score(flat_prompts, flat, **cols)
        if len(scores) != 2 * n:
            raise ValueError(f"{type(self).__name__}.score returned {len(scores)} scores for {2 * n} completions")
        out: list = []
        for i in range(n):
            a, b = scores[2 * i], scores[2 * i + 1]
            if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
                out.append(0.5 if return_scores else -1)
            elif return_scores:
                out.append(float(torch.sigmoid(torch.tensor((a - b) / temperature))))
            else:
                out.append(-1 if abs(a - b) <= self.tie_margin else (0 if a > b else 1))
        return out


class RewardFunctionJudge(ScorePairwiseJudge):
    """A rule judge: a reward function (reward contract ``f(prompts, completions, completion_ids, **columns)``,
    a built-in name, an import path) scores each completion and the higher reward wins.

    >>> judge = RewardFunctionJudge("arithmetic")
    >>> judge.judge(["What is 2 + 3?\\n"], [["<answer>5</answer>", "<answer>6</answer>"]], answer=["5"])
    [0]
    """

    def __init__(self, reward_func: Any, tie_margin: float = 0.0, **context: Any) -> None:
        from .rewards import resolve_reward_func, reward_func_name

        super().__init__(tie_margin)
        self.reward_func = resolve_reward_func(reward_func, **context)
        self.name = reward_func_name(self.reward_func)

    def score(self, prompts: list[Any], completions: list[Any], **columns: list) -> list[float]:
        values = self.reward_func(prompts=prompts, completions=completions, completion_ids=[[] for _ in completions],
                                  **_accepted_kwargs(self.reward_func, columns))
        return [None if v is None else float(v) for v in values]


class RewardModelJudge(ScorePairwiseJudge):
    """A reward model as a judge: a sequence-classification model (with ``tokenizer``), a reward-model folder
    written by `RewardTrainer`, a hub name, or ``tiny:<spec>``; scored by `RewardModelScorer`."""

    def __init__(self, model: Any, tokenizer: Any = None, batch_size: int = 16, tie_margin: float = 0.0,
                 **scorer_kwargs: Any) -> None:
        from .rewards import RewardModelScorer

        super().__init__(tie_margin)
        self.scorer = model if isinstance(model, RewardModelScorer) else \
            RewardModelScorer(model, tokenizer=tokenizer, batch_size=batch_size, **scorer_kwargs)

    def score(self, prompts: list[Any], completions: list[Any], **columns: list) -> list[float]:
        return self.scorer(prompts, completions)


class PairRMJudge(BasePairwiseJudge):
    """PairRM (Jiang et al. 2023, "LLM-Blender", arXiv:2306.02561), a pairwise ranker, through the
    ``llm-blender`` package: ``PairRMJudge()`` loads ``llm-blender/PairRM`` from the hub cache or a local
    folder. ``blender`` is an already loaded ``llm_blender.Blender`` (or anything with its ``rank`` method).

    ``return_scores=True`` gives the softmax (at ``temperature``) of the ranker's two logits: the
    probability that the first completion is better.
    """

    def __init__(self, model_name_or_path: str = "llm-blender/PairRM", device: str | None = None,
                 blender: Any = None, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        if blender is not None:
            self.blender = blender
            return
        try:
            import llm_blender  # type: ignore[import-not-found]
        except ImportError:
            raise ImportError(
                "PairRMJudge needs the llm-blender package (pip install llm-blender) and the PairRM weights "
                f"({model_name_or_path!r}, from the hub or a local folder). Offline, judge with "
                "RewardModelJudge (a trained reward model), RewardFunctionJudge (a rule) or LLMPairwiseJudge "
                "(a local chat model) instead.") from None
        self.blender = llm_blender.Blender()
        try:
            self.blender.loadranker(model_name_or_path, device=device)
        except Exception as err:  # noqa: BLE001 - hub or file errors: re-raised naming the model
            raise RuntimeError(f"PairRMJudge could not load {model_name_or_path!r} ({type(err).__name__}: {err}); "
                               "pass a local folder with the PairRM weights, or use another judge") from err

    def judge(self, prompts: list[Any], completions: list[list[Any]], shuffle_order: bool = True,
              return_scores: bool = False, temperature: float = 1.0) -> list:
        _check_pairs(prompts, completions)
        if not prompts:
            return []
        flip = [shuffle_order and self.rng.random() < 0.5 for _ in prompts]
        shown = [list(reversed(pair)) if f else list(pair) for pair, f in zip(completions, flip)]
        ranks = torch.as_tensor(self.blender.rank(list(prompts), shown, return_scores=return_scores,
                                                  disable_tqdm=True), dtype=torch.float64)
        if return_scores:
            probs = torch.softmax(ranks / temperature, dim=-1)
            first = probs[:, 0]
            return [float(1.0 - p) if f else float(p) for p, f in zip(first, flip)]
        better = (ranks[:, 0] - 1).long()  # the ranker's ranks are 1-based: rank of the first shown completion
        return [int(1 - b) if f else int(b) for b, f in zip(better.tolist(), flip)]


def call_judge(judge: Any, prompts: list[Any], pairs: list[list[Any]], columns: dict[str, list] | None = None,
               return_scores: bool = False) -> list:
    """``judge.judge(prompts, pairs)``, with the dataset ``columns`` and ``return_scores`` passed only to
    judges whose ``judge`` method takes them (TRL's judges take neither)."""
    kwargs: dict[str, Any] = dict(_accepted_kwargs(judge.judge, dict(columns or {})))
    if return_scores:
        kwargs["return_scores"] = True
    verdicts = judge.judge(prompts, pairs, **kwargs)
    if len(verdicts) != len(pairs):
        raise ValueError(f"judge {type(judge).__name__} returned {len(verdicts)} verdicts for {len(pairs)} pairs")
    return list(verdicts)


def judge_pairs(judge: Any, prompts: list[Any], pairs: list[list[Any]],
                columns: dict[str, list] | None = None) -> torch.Tensor:
    """``[P]`` preference of the first completion of each pair from the judge's verdict (as TRL's Nash-MD
    uses a judge): 1 when it is better, 0 when the second is, 0.5 for a tie or a failed verdict."""
    verdicts = call_judge(judge, prompts, pairs, columns)
    out = []
    for i, v in enumerate(verdicts):
        if v not in (0, 1, -1):
            raise ValueError(f"judge {type(judge).__name__} returned {v!r} for pair {i}; expected 0, 1 or -1")
        out.append(0.5 if v == -1 else 1.0 - float(v))
    return torch.tensor(out)
