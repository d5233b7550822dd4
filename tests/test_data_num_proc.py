"""Results never depend on `dataset_num_proc` or on the `datasets` cache.

What a trainer decides about its data (the format, conversational or not, truncation and dropped-row counts)
is computed once in the main process from the dataset itself (`FormatInfo`) and passed to the tokenizing
function explicitly; nothing is recorded as a side effect inside `datasets.map`, where worker processes would
lose it. Each case tokenizes the same data with `dataset_num_proc` None, 1 and 2, and once more from a data file
whose tokenized form the `datasets` cache already holds, and checks that the tokenized rows, the data counts and
the first step's loss (offline) or the reward functions' inputs (online) are identical.
"""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.models import build_tiny
from posttrain.tasks import ArithmeticTask

from _data_helpers import trainer_case
from _online_helpers import _one_thread  # noqa: F401  (autouse)

VARIANTS = ("none", "1", "2", "cache_warm")


def _num_proc(variant: str) -> int | None:
    return {"none": None, "1": 1, "2": 2, "cache_warm": 2}[variant]


def _common(tmp, **kw):
    base = dict(output_dir=str(tmp / "run"), per_device_train_batch_size=4, max_steps=1, report_to="none",
                save_strategy="no", disable_tqdm=True, logging_steps=1, max_length=60)
    base.update(kw)
    return base


def _dataset_for(variant: str, dataset, tmp):
    """The dataset itself, or (cache_warm) the same rows read from a JSON-lines file, tokenized once beforehand
    so the second tokenization is served from the `datasets` cache."""
    if variant != "cache_warm":
        return dataset
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in dataset.to_list()))
    return str(path)


def _first_loss(trainer) -> float:
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch)))


def _offline_run(method: str, variant: str, tmp):
    # max_length=60 truncates some rows, so the truncation counts are compared too
    trainer_cls, config_cls, extra, dataset = trainer_case(method, 8)
    data = _dataset_for(variant, dataset, tmp)
    results = []
    for _ in range(2 if variant == "cache_warm" else 1):  # cache_warm: the second run reads the cache
        args = config_cls(**_common(tmp, dataset_num_proc=_num_proc(variant), **extra))
        # by name: each method builds its own seeded tiny model (a score head for reward and PRM)
        trainer = trainer_cls(model="tiny:nano", args=args, train_dataset=data)
        results.append((trainer.train_dataset.to_list(), dict(trainer._totals), _first_loss(trainer)))
    if variant == "cache_warm":
        assert results[0][0] == results[1][0] and results[0][1] == results[1][1], "cache changed the data"
    return results[-1]


_SLOW = pytest.mark.slow  # four tokenizations (two of them in worker processes) and a forward each: ~10 s


@pytest.mark.parametrize("method", ["sft", *(pytest.param(m, marks=_SLOW) for m in (
    "sft_packed", "dpo", "dpo_implicit", "cpo", "orpo", "kto", "kto_from_pairs", "bco", "reward", "prm"))])
def test_offline_first_step_loss_is_the_same_whatever_num_proc_and_cache(method, tmp_path):
    runs = {v: _offline_run(method, v, tmp_path / v) for v in VARIANTS}
    rows, totals, loss = runs["none"]
    assert rows and torch.isfinite(torch.tensor(loss))
    for variant, (v_rows, v_totals, v_loss) in runs.items():
        assert v_rows == rows, f"{method}: tokenized rows differ with {variant}"
        assert v_totals == totals, f"{method}: data counts differ with {variant}: {v_totals} vs {totals}"
        assert v_loss == pytest.approx(loss, abs=1e-6), f"{method}: first-step loss differs with {variant}"


class _Spy:
    """A reward function that records what it was handed."""

    __name__ = "spy"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.calls.append((prompts, completions, [len(c) for c in completion_ids], sorted(kwargs)))
        return [float(len(completion_ids[i]) % 3) for i in range(len(completions))]


@pytest.mark.slow  # five short runs, two tokenizing in worker processes: ~20 s
@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_online_reward_inputs_are_the_same_whatever_num_proc_and_cache(method, tmp_path):
    """The regression: with conversational prompts and dataset_num_proc=1 or 2, reward functions must still be
    handed message lists (as with None), never plain strings."""
    import posttrain as pt

    trainer_cls, config_cls = {"grpo": (pt.GRPOTrainer, pt.GRPOConfig), "rloo": (pt.RLOOTrainer, pt.RLOOConfig)}[method]
    dataset = ArithmeticTask(digits=2, conversational=True).prompt_only(8)
    seen = {}
    for variant in VARIANTS:
        data = _dataset_for(variant, dataset, tmp_path / variant)
        for _ in range(2 if variant == "cache_warm" else 1):
            spy = _Spy()
            model, tok = build_tiny("nano", seed=0)
            args = config_cls(**_common(tmp_path / variant, dataset_num_proc=_num_proc(variant), num_generations=2,
                                        max_completion_length=4, log_completions=False, max_length=None))
            trainer = trainer_cls(model, spy, args, train_dataset=data, processing_class=tok)
            trainer.train()
            seen[variant] = spy.calls
    reference = seen["none"]
    prompts, completions, _, _ = reference[0]
    assert isinstance(prompts[0], list) and prompts[0][0]["role"] in ("system", "user")
    assert isinstance(completions[0], list) and completions[0][0]["role"] == "assistant"
    for variant, calls in seen.items():
        assert calls == reference, f"{method}: reward inputs differ with dataset_num_proc variant {variant}"
