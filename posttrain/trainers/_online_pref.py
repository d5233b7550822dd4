"""What Online DPO, XPO and Nash-MD share on top of the online loop (`posttrain.trainers._online`).

Each method samples two completions per prompt (two policy samples; or a policy and a reference sample; or
a policy and a mixture sample), asks a judge or the reward functions which is better (`preference`), and
trains a pairwise loss against the reference policy. This module holds the config fields (TRL's names:
``beta`` as a float or one value per epoch, ``loss_type``, ``missing_eos_penalty``, ``max_new_tokens``), the
judge / reward plumbing, the second rollout engine (`posttrain.online.engine_mixture.MixtureEngine`: the
reference, or the geometric mixture) and the pairing helpers.

A pair is one group of the rollout (``group_ids``): `RolloutBatch.split` never cuts a group while each
micro-batch gets at least one, which the config checks (``per_device_train_batch_size >= num_generations``),
so both sides of a pair always train in the same micro-batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from ..online.engine_mixture import MixtureEngine
from ..online.engines import Rollout, SamplingParams
from ..online.judges import BasePairwiseJudge, BaseRankJudge, call_judge, judge_pairs
from ..online.pipeline import ScoredRollout
from ..online.rollout_batch import RolloutBatch
from ._online import OnlineTrainer
from ._online_config import OnlineConfig, RewardModelPathField, with_reward_model_path
from ._online_trl import OnlineTRLFields, OnlineTRLMixin

__all__ = ["OnlinePreferenceConfig", "OnlinePreferenceTrainer", "epoch_value"]


def epoch_value(value: float | Sequence[float], epoch: float | None) -> float:
    """A coefficient given as one number or one per epoch (the last one for the epochs after the list)."""
    if isinstance(value, (int, float)):
        return float(value)
    values = list(value)
    return float(values[min(int(epoch or 0), len(values) - 1)])


def _per_epoch(name: str, value: Any, low: float = 0.0, high: float | None = None) -> float | list[float]:
    """A float, or a non-empty list of floats (one element: that float); each in [low, high]."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ValueError(f"{name}=[]: expected a number or one number per epoch")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < low or (high is not None and v > high):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ValueError(f"{name}={value!r}: expected a number {bound}, or a list of them (one per epoch)")
    values = [float(v) for v in values]
    return values[0] if len(values) == 1 else values


@dataclass
class OnlinePreferenceConfig(RewardModelPathField, OnlineTRLFields, OnlineConfig):
    """Fields shared by `OnlineDPOConfig`, `XPOConfig` and `NashMDConfig` (TRL's names and defaults)."""

    num_generations: int = field(default=2, metadata={"help": "Completions sampled per prompt (a pair)."})
    beta: list[float] = field(default_factory=lambda: [0.1], metadata={"help": (
        "Strength of the pull to the reference policy; one value, or one per epoch (the last one for the epochs "
        "after the list). For loss_type='ipo' it is IPO's tau.")})
    loss_type: str = field(default="sigmoid", metadata={"help": "'sigmoid' (DPO) or 'ipo'."})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": (
        "Subtracted from the reward of a completion that ends without an EOS token (it ran into "
        "max_new_tokens), so the policy learns to finish. Applies to reward functions, not judges.")})
    max_new_tokens: int | None = field(default=None, metadata={"help": (
        "TRL's name for max_completion_length (most tokens generated per completion); set, it wins.")})
    max_completion_length: int | None = field(default=64, metadata={"help": "Most tokens generated per completion."})
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature (log-probs use the same)."})
    learning_rate: float = field(default=5e-7, metadata={"help": "Peak learning rate of AdamW."})

    def __post_init__(self) -> None:
        self.beta = _per_epoch("beta", self.beta)
        if self.max_new_tokens is not None:
            self.max_completion_length = self.max_new_tokens
        self._resolve_online_trl_fields()
        super().__post_init__()
        self.max_new_tokens = self.max_completion_length
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"loss_type={self.loss_type!r}: expected 'sigmoid' or 'ipo'")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError(f"missing_eos_penalty={self.missing_eos_penalty}: expected a penalty >= 0")
        if self.per_device_train_batch_size < self.num_generations:
            raise ValueError(f"per_device_train_batch_size={self.per_device_train_batch_size} < num_generations="
                             f"{self.num_generations}: a micro-batch must hold at least one whole prompt's "
                             "completions, or a preference pair would be split over micro-batches")


class OnlinePreferenceTrainer(OnlineTRLMixin, OnlineTrainer):
    """Base of the online preference trainers: ``(model, ref_model=None, reward_funcs=None, args, data_collator,
    train_dataset, eval_dataset, processing_class, reward_processing_classes, peft_config, ..., judge=None)``.

    Exactly one of ``judge`` (a `BasePairwiseJudge` or `BaseRankJudge`) and ``reward_funcs`` (reward
    functions, reward models or their paths; ``reward_model=`` is TRL's older name) ranks the completions.
    """

    config_class: ClassVar = OnlinePreferenceConfig
    _tag_names: ClassVar = ["posttrain", "online-preference"]

    def __init__(self, model: Any, ref_model: Any = None, reward_funcs: Any = None,
                 args: OnlinePreferenceConfig | None = None, data_collator: Any = None, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None, reward_processing_classes: Any = None,
                 peft_config: Any = None, compute_metrics: Any = None, callbacks: list | None = None,
                 optimizers: tuple = (None, None), preprocess_logits_for_metrics: Any = None, *,
                 judge: Any = None, reward_model: Any = None, **kwargs: Any) -> None:
        """TRL's parameters in TRL's order; ``judge`` and ``reward_model`` (TRL's older names) by keyword."""
        if data_collator is not None:
            raise ValueError(f"{type(self).__name__} collates prompts itself; drop data_collator=")
        if reward_model is not None:
            funcs = [] if reward_funcs is None else (list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs])
            reward_funcs = funcs + [reward_model]
        elif getattr(args, "reward_model_path", None):  # TRL's field: the reward model to load, scoring first
            if judge is not None:
                raise ValueError("pass either judge= or reward_model_path (a reward model), not both: one of them "
                                 "ranks the pairs")
            reward_funcs = with_reward_model_path(reward_funcs, args)
            if isinstance(reward_processing_classes, (list, tuple)):
                reward_processing_classes = [None, *reward_processing_classes]
        if judge is None and not reward_funcs:
            raise ValueError(f"{type(self).__name__} needs a judge (judge=...) or reward functions (reward_funcs=...) "
                             "to tell the better completion of each pair")
        if judge is not None and reward_funcs:
            raise ValueError("pass either judge= or reward_funcs= (reward_model=), not both: one of them ranks the pairs")
        if judge is not None and not callable(getattr(judge, "judge", None)):
            raise TypeError(f"judge must have a judge(prompts, completions) method (a BasePairwiseJudge), got "
                            f"{type(judge).__name__}")
        self.judge = judge
        self._second_engine: MixtureEngine | None = None
        super().__init__(model, reward_funcs, args, train_dataset, eval_dataset, processing_class,
                         reward_processing_classes, peft_config, callbacks, optimizers, ref_model=ref_model,
                         compute_metrics=compute_metrics, preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                         **kwargs)
        self._setup_online_trl()

    # ------------------------------------------------------------------------------ loop hooks
    @property
    def uses_reference(self) -> bool:
        return True

    @property
    def importance_sampling(self) -> bool:
        """The pairwise losses take the samples as data (as TRL's trainers do): no importance weights."""
        return False

    def _needs_old_logps(self) -> bool:
        return False

    def informative_groups(self, scored: ScoredRollout) -> torch.Tensor:
        """Pairs with a preference (not a tie)."""
        return scored.scores["pair_weight"].view(-1, 2)[:, 0] > 0

    def coefficient(self, name: str) -> float:
        """``args.<name>`` at the current epoch (``beta``, ``alpha``, ``mixture_coef``)."""
        return epoch_value(getattr(self.args, name), self.state.epoch)

    # -------------------------------------------------------------------------------- sampling
    def second_engine(self, mixture_coef: float) -> MixtureEngine:
        """The engine of the pair's second sample: the reference (``mixture_coef=1``) or the geometric mixture
        of policy and reference, on the training model (also when the policy samples on vLLM)."""
        if self._second_engine is None:
            self._second_engine = MixtureEngine(self.model, self.tokenizer, ref_model=self.ref_model,
                                                max_batch_size=self.args.generation_max_batch_size)
        self._second_engine.mixture_coef = mixture_coef
        return self._second_engine

    def paired_rollout(self, rows: list[dict], mode: str, params: SamplingParams | None,
                       mixture_coef: float) -> Rollout:
        """Per prompt, one policy sample then one sample of the mixture with ``mixture_coef``
        (``scores["from_policy"]`` tells them apart after scoring)."""
        params = params or self.sampling_params(mode)
        single = SamplingParams(**{**params.to_dict(), "n": 1})
        first = super().rollout(rows, mode, single)
        start = time.perf_counter()
        other = SamplingParams(**{**single.to_dict(), "seed": None if single.seed is None else single.seed + 7919})
        second = self.second_engine(mixture_coef).generate([r["prompt_ids"] for r in rows], other).check()
        if mode == "train":
            self.timings["generate"] += time.perf_counter() - start
        out = Rollout()
        for j in range(len(first)):
            for r in (first, second):
                out.prompt_index.append(r.prompt_index[j])
                out.prompt_ids.append(r.prompt_ids[j])
                out.completion_ids.append(r.completion_ids[j])
                out.texts.append(r.texts[j])
                out.logprobs.append(r.logprobs[j])
                out.truncated.append(r.truncated[j])
        return out.check()

    # --------------------------------------------------------------------------------- scoring
    def scored_rewards(self, scored: ScoredRollout) -> torch.Tensor:
        """``[N]`` reward totals, minus ``missing_eos_penalty`` for completions without EOS (NaN: unscored)."""
        rewards = scored.rewards
        total = torch.where(rewards.valid, rewards.total, torch.nan)
        if self.args.missing_eos_penalty is not None:
            total = total - self.args.missing_eos_penalty * torch.tensor(scored.rollout.truncated, dtype=torch.float32)
        return total

    def pair_preference(self, scored: ScoredRollout, first: list[int], second: list[int]) -> torch.Tensor:
        """``[P]`` preference of completion ``first[p]`` over ``second[p]`` (same prompt): from the judge, 1 / 0
        (0.5 for a tie); from rewards, ``sigma(r_first - r_second)`` (0.5 when either is unscored)."""
        if self.judge is not None:
            prompts = [scored.prompts[i] for i in first]
            pairs = [[scored.completions[i], scored.completions[k]] for i, k in zip(first, second)]
            cols = scored.columns()
            return judge_pairs(self.judge, prompts, pairs, {c: [v[i] for i in first] for c, v in cols.items()})
        total = self.scored_rewards(scored)
        diff = total[first] - total[second]
        return torch.sigmoid(diff).nan_to_num(0.5)

    def best_and_worst(self, scored: ScoredRollout) -> tuple[list[int], list[int], torch.Tensor]:
        """Per prompt, the indices of its best and worst completion, and ``[P]`` 1 where they differ in
        quality (0: a tie, e.g. equal rewards or a judge that could not decide)."""
        groups: dict[int, list[int]] = {}
        for j, k in enumerate(scored.rollout.prompt_index):
            groups.setdefault(k, []).append(j)
        members = list(groups.values())
        best, worst, decided = [], [], []
        if self.judge is None:
            total = self.scored_rewards(scored).nan_to_num(float("-inf"))
            for g in members:
                vals = total[g]
                best.append(g[int(vals.argmax())])
                worst.append(g[int(vals.argmin())])
                decided.append(float(vals.max() > vals.min()))
            return best, worst, torch.tensor(decided)
        if isinstance(self.judge, BaseRankJudge) and not isinstance(self.judge, BasePairwiseJudge):
            ranks = call_judge(self.judge, [scored.prompts[g[0]] for g in members],
                               [[scored.completions[j] for j in g] for g in members])
            for g, order in zip(members, ranks):
                best.append(g[order[0]])
                worst.append(g[order[-1]])
                decided.append(1.0)
            return best, worst, torch.tensor(decided)
        # a pairwise judge over k > 2 completions: every pair once, most wins is best, fewest worst (Copeland)
        pairs = [(a, b) for g in members for i, a in enumerate(g) for b in g[i + 1:]]
        prefs = self.pair_preference(scored, [a for a, _ in pairs], [b for _, b in pairs])
        wins: dict[int, float] = {j: 0.0 for g in members for j in g}
        for (a, b), p in zip(pairs, prefs.tolist()):
            wins[a] += p
            wins[b] += 1.0 - p
        for g in members:
            ordered = sorted(g, key=lambda j: -wins[j])  # stable: ties keep sampling order
            best.append(ordered[0])
            worst.append(ordered[-1])
            decided.append(float(wins[ordered[0]] > wins[ordered[-1]]))
        return best, worst, torch.tensor(decided)

    @staticmethod
    def select_completions(scored: ScoredRollout, picked: list[int], scores: dict[str, torch.Tensor]) -> ScoredRollout:
        """The completions at ``picked`` (consecutive ones of a prompt stay a group) with new named ``scores``."""
        r = scored.rollout
        rollout = Rollout([r.prompt_index[j] for j in picked], [r.prompt_ids[j] for j in picked],
                          [r.completion_ids[j] for j in picked], [r.texts[j] for j in picked],
                          [r.logprobs[j] for j in picked], [r.truncated[j] for j in picked])
        rewards = None if scored.rewards is None else scored.rewards.select(picked)
        return ScoredRollout(scored.rows, rollout, [scored.completions[j] for j in picked], rewards, scores,
                             scored.weight_version, dict(scored.metrics))

    # ---------------------------------------------------------------------------------- metrics
    @staticmethod
    def pairs_of(batch: RolloutBatch, flag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first [P], second [P])`` row indices of each two-row group of ``batch``: ``first`` the row whose
        ``flag`` is set (chosen, or the policy's sample)."""
        first, second = [], []
        flags = flag.tolist()
        for g in batch.groups():
            if len(g) != 2:
                raise RuntimeError(f"a preference group has {len(g)} rows in this micro-batch; expected a whole pair")
            a, b = (g[0], g[1]) if flags[g[0]] > flags[g[1]] else (g[1], g[0])
            first.append(a)
            second.append(b)
        device = flag.device
        return torch.tensor(first, device=device), torch.tensor(second, device=device)

    @staticmethod
    def sequence_metrics(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """TRL's ``objective/kl`` (mean over completions of ``sum_t log pi - log ref``) and ``objective/entropy``
        (mean of ``-sum_t log pi``), on the sampled tokens."""
        m = mask.to(logps.dtype)
        seq = (logps.detach() * m).sum(-1)
        return {"objective/kl": (seq - (ref_logps * m).sum(-1)).mean(), "objective/entropy": (-seq).mean()}

    def close(self) -> None:
        super().close()
        if self._second_engine is not None:
            self._second_engine.close()


@dataclass
class JudgeArgs:
    """Command-line / YAML judge of the online preference methods (instead of reward functions)."""

    judge: str | None = field(default=None, metadata={"help": (
        "Rank the pairs with a judge instead of reward functions: 'pairrm' (PairRMJudge, needs llm-blender), "
        "'rule:<reward function>' (e.g. rule:arithmetic), 'reward_model:<folder or tiny:spec>', an "
        "OpenAI-compatible endpoint 'http://host:port/v1' (with judge_model), or an import path "
        "'package.module:JudgeClass'.")})
    judge_model: str | None = field(default=None, metadata={"help": (
        "The model name sent to an endpoint judge, or an in-process chat model for judge='llm'.")})


def make_judge(spec: str, model: str | None = None) -> Any:
    """The judge a `JudgeArgs.judge` string names (see its help)."""
    from ..online import judge_llm, judges

    if spec == "pairrm":
        return judges.PairRMJudge(**({"model_name_or_path": model} if model else {}))
    if spec.startswith("rule:"):
        return judges.RewardFunctionJudge(spec[len("rule:"):])
    if spec.startswith("reward_model:"):
        return judges.RewardModelJudge(spec[len("reward_model:"):])
    if spec.startswith(("http://", "https://")):
        return judge_llm.LLMPairwiseJudge(model or "judge", base_url=spec)
    if spec == "llm":
        if not model:
            raise ValueError("judge='llm' needs judge_model: the chat model (name, folder or tiny:spec) that judges")
        return judge_llm.LLMPairwiseJudge(model)
    if ":" in spec:
        from ..online.rewards.compose import _import_object

        return _import_object(spec)()
    raise ValueError(f"unknown judge {spec!r}: expected 'pairrm', 'rule:<reward>', 'reward_model:<path>', 'llm', "
                     "an http(s) endpoint or 'package.module:JudgeClass'")


def preference_trainer_kwargs(script: object, rewards: Any, judging: JudgeArgs, config: Any = None) -> dict:
    """`MethodSpec.trainer_kwargs`: the judge when one is named, else the reward functions (`arithmetic` by
    default, as for the other online methods; the config's reward_model_path is loaded by the trainer)."""
    from ._online_config import reward_trainer_kwargs

    if judging.judge:
        if rewards.reward_funcs or getattr(config, "reward_model_path", None):
            raise ValueError("give either judge or reward_funcs / reward_model_path, not both")
        return {"judge": make_judge(judging.judge, judging.judge_model)}
    return reward_trainer_kwargs(script, rewards, config)
