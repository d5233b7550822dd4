"""Shared helpers of the preference-trainer tests: the arithmetic task's data laid out without overlap, a tiny
model briefly SFT-ed on the task (cached), and held-out pair metrics measured independently of the trainers."""
from __future__ import annotations

import copy
import gc
import hashlib
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from posttrain.models import build_tiny
from posttrain.tasks import ArithmeticTask
from posttrain.trainers._preference import SequenceCollator, sequence_logps, tokenize_completions

SPEC = "nano"
SFT_STEPS = 500  # held-out chosen log-prob about -1.1: strong enough that likelihood can rise
WEAK_SFT_STEPS = 250  # about 73% of held-out pairs ranked right by likelihood: room for reference-free methods
_FIELDS = (("prompt_ids", "chosen_ids"), ("prompt_ids", "rejected_ids"))


def layout(n_train: int = 1200, n_test: int = 128, n_sft: int = 2000):
    """(train pairs, held-out pairs, SFT rows) on disjoint problems of the task's seeded stream:
    held-out = problems [0, n_test), train = the next n_train, SFT = the n_sft after those."""
    task = ArithmeticTask(digits=2)
    pref = task.preference(n_test + n_train)
    sft = task.split(n_test + n_train, n_sft, train_format="prompt_only", test_format="prompt_completion")["test"]
    return pref.select(range(n_test, n_test + n_train)), pref.select(range(n_test)), sft


def sft_base(cache_dir: str | os.PathLike, steps: int = SFT_STEPS, spec: str = SPEC):
    """A tiny model SFT-ed for `steps` on correct solutions, cached under `cache_dir` keyed by everything that
    determines it. The train pairs cover 1200 problems so 150 steps of 8 stay within one epoch: more epochs
    over fewer pairs overfit and lower the held-out chosen likelihood whatever the loss."""
    from posttrain import SFTConfig, SFTTrainer

    _, _, sft = layout()
    model, tok = build_tiny(spec, seed=0)
    key = hashlib.sha256(repr((spec, steps, sft[0], sft[-1], len(tok), torch.__version__)).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"sft_{spec}_{steps}_{key}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model, tok
    args = SFTConfig(output_dir=str(Path(cache_dir) / "sft_run"), per_device_train_batch_size=16, max_steps=steps,
                     learning_rate=3e-3, warmup_steps=10, logging_steps=1000, save_strategy="no", report_to="none",
                     seed=0, disable_tqdm=True)
    SFTTrainer(model=model, args=args, train_dataset=sft, processing_class=tok).train()
    model.eval()
    torch.save(model.state_dict(), path)
    return model, tok


@dataclass
class PairStats:
    accuracy: float  # share of pairs whose implicit reward ranks chosen above rejected
    chosen_logp: float  # mean summed log-prob of the chosen completions


@torch.no_grad()
def pair_logps(model, tok, dataset, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Summed log-probs (`c`, `r`) and lengths (`lc`, `lr`) of every pair's chosen and rejected completion."""
    was_training = model.training
    model.eval()
    feats = []
    for row in dataset:
        p, (c, j), _ = tokenize_completions(tok, row["prompt"], [row["chosen"], row["rejected"]])
        feats.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": j})
    collate = SequenceCollator(tok.pad_token_id, _FIELDS)
    out: dict[str, list] = {"c": [], "r": [], "lc": [], "lr": []}
    for s in range(0, len(feats), batch_size):
        chunk = feats[s:s + batch_size]
        res = sequence_logps(model, collate(chunk))
        n = len(chunk)
        out["c"].append(res.logps[:n])
        out["r"].append(res.logps[n:])
        out["lc"].append(res.lengths[:n].float())
        out["lr"].append(res.lengths[n:].float())
    model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}


def pair_stats(model, tok, dataset, ref: dict | None = None, average: bool = False) -> PairStats:
    """Held-out reward accuracy. Reward: ``log pi - log pi_ref`` with `ref` (DPO, KTO, BCO), else ``log pi``
    (CPO), per token when `average` (SimPO, ORPO). Ties count as wrong."""
    lp = pair_logps(model, tok, dataset)
    c, r = lp["c"], lp["r"]
    if ref is not None:
        c, r = c - ref["c"], r - ref["r"]
    if average:
        c, r = c / lp["lc"], r / lp["lr"]
    return PairStats(float((c > r).float().mean()), float(lp["c"].mean()))


def train_and_measure(trainer_cls, config_cls, base, tok, out_dir, *, reference: bool, average: bool = False,
                      **config):
    """Train a copy of `base` on the train pairs; return (before, after) held-out PairStats."""
    train, test, _ = layout()
    model = copy.deepcopy(base)
    ref = pair_logps(model, tok, test) if reference else None
    before = pair_stats(model, tok, test, ref, average)
    args = config_cls(output_dir=str(out_dir), per_device_train_batch_size=8, logging_steps=1000,
                      save_strategy="no", report_to="none", disable_tqdm=True, seed=0, **config)
    trainer_cls(model, args=args, train_dataset=train, processing_class=tok).train()
    after = pair_stats(model, tok, test, ref, average)
    print(f"{trainer_cls.__name__} {config}: held-out reward accuracy {before.accuracy:.3f} -> {after.accuracy:.3f}, "
          f"chosen log-prob {before.chosen_logp:.3f} -> {after.chosen_logp:.3f}")
    return before, after


def make_args(config_cls, tmp_path, **overrides):
    """A short-run config for unit tests: 2 steps of 4 rows, lr 1e-3, logging every step, no saving; the
    reference log-prob cache (methods with a reference) goes under `tmp_path`."""
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=8,
                max_steps=2, learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no",
                disable_tqdm=True, seed=0)
    if "ref_logps_cache_dir" in {f.name for f in fields(config_cls)}:
        base["ref_logps_cache_dir"] = str(tmp_path / "cache")
    base.update(overrides)
    return config_cls(**base)


def llama_count() -> int:
    """Live `LlamaForCausalLM` objects (after a GC pass): how many full models are held in memory."""
    gc.collect()
    return sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects())


def cache_dir(request, tmp_path_factory) -> Path:
    """pytest's cache folder (shared by test files and runs) when the cache plugin is on, else a temp dir."""
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("posttrain_pref_sft")) if cache is not None else tmp_path_factory.mktemp("sft")
