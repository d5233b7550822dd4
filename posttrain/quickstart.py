"""`posttrain quickstart`: the whole loop on one CPU in minutes, with nothing downloaded.

It builds a seeded tiny model with the project's own tokenizer, measures held-out exact-match accuracy on the
built-in arithmetic task, trains it with SFT, measures again, and saves the model, the loss curve (PNG) and
a `results.json` under `runs/quickstart/`. The stages (SFT, then GRPO) are the entries of `STAGES`, in order; `quickstart_curves.png` shows what
each optimizes (loss, token accuracy, reward per function) and held-out exact match along the way.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

__all__ = ["QuickstartOptions", "run_quickstart", "quickstart_main", "STAGES"]


@dataclass
class QuickstartOptions:
    """Knobs of the quickstart; the defaults are what the README's numbers come from."""

    output_dir: str = "runs/quickstart"
    model: str = "tiny:quick"
    digits: int = 2
    train_size: int = 3800  # of the 4095 distinct two-digit sums; the held-out ones are disjoint
    test_size: int = 200
    # SFT learns from the worked solutions of the first `sft_size` train problems; GRPO then trains on the
    # prompts of the others, whose solutions it never sees (only the reward checks the answer): worked
    # demonstrations are costly, checkable prompts cheap. A model SFT-ed on every problem leaves RL little to do.
    # 0: no split, both stages use every train problem.
    sft_size: int = 3000
    # The demonstrator skips its reasoning on this share of the SFT rows (the completion is only the
    # `<answer>`): SFT imitates the mix, so its greedy answers are mostly unworked guesses, while GRPO,
    # rewarded only for the right answer, finds that working the columns pays and moves to it.
    sft_answer_only: float = 0.5
    seed: int = 0
    sft_steps: int = 400
    sft_learning_rate: float = 1.5e-3
    sft_batch_size: int = 32
    grpo_steps: int = 80
    grpo_learning_rate: float = 1e-4
    grpo_generations: int = 8
    grpo_batch_size: int = 64  # completions per step: 8 prompts x 8 samples
    grpo_temperature: float = 1.0
    # held-out exact match is also measured `curve_points` times during each stage (and before it), on the
    # first `curve_size` held-out problems (0: no curve), for the plots
    curve_points: int = 4
    curve_size: int = 100
    stages: tuple[str, ...] = ("sft", "grpo")
    extra: dict[str, Any] = field(default_factory=dict)


# A stage takes (model, tokenizer, task, options, results) and returns the trained model.
STAGES: dict[str, Callable[..., Any]] = {}


def _evaluate(model: Any, tokenizer: Any, test: Any) -> float:
    from .tasks import exact_match

    return exact_match(model, tokenizer, test, max_new_tokens=64, batch_size=100)


def stage_split(task: Any, opts: QuickstartOptions, kind: str, stage: str) -> tuple[Any, Any]:
    """The (train, held-out) rows of `kind` a stage uses: "sft" gets the first `sft_size` train problems,
    "grpo" the rest (all of them when fewer than one GRPO batch of prompts would remain, or `sft_size` is 0).
    The held-out problems are the same for every stage."""
    extra = {"answer_only": opts.sft_answer_only} if stage == "sft" and kind == "prompt_completion" else {}
    splits = task.split(opts.train_size, opts.test_size, kind, kind, **extra)
    train, test = splits["train"], splits["test"]
    cut = min(opts.sft_size, len(train)) if opts.sft_size > 0 else len(train)
    if stage == "sft":
        return train.select(range(cut)), test
    if stage == "grpo":
        enough = len(train) - cut >= max(1, opts.grpo_batch_size // opts.grpo_generations)
        return (train.select(range(cut, len(train))) if enough else train), test
    raise ValueError(f"unknown quickstart stage {stage!r}; expected 'sft' or 'grpo'")


def _curve_callbacks(tokenizer: Any, task: Any, opts: QuickstartOptions, steps: int) -> list:
    """The held-out exact-match curve of a stage (`ExactMatchCallback`), unless `curve_size` is 0."""
    from .tasks import ExactMatchCallback

    if opts.curve_size <= 0:
        return []
    test = task.split(opts.train_size, opts.test_size, "prompt_only", "prompt_only")["test"]
    every = max(1, steps // max(1, opts.curve_points))
    return [ExactMatchCallback(tokenizer, test.select(range(min(opts.curve_size, len(test)))), every)]


def _sft_stage(model: Any, tokenizer: Any, task: Any, opts: QuickstartOptions, results: dict) -> Any:
    from .files import copy_file
    from .trainers.sft import SFTConfig, SFTTrainer

    train, valid = stage_split(task, opts, "prompt_completion", "sft")
    out = os.path.join(opts.output_dir, "sft")
    config = SFTConfig(
        output_dir=out,
        max_steps=opts.sft_steps,
        learning_rate=opts.sft_learning_rate,
        per_device_train_batch_size=opts.sft_batch_size,
        per_device_eval_batch_size=64,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.0,
        logging_steps=10,
        eval_strategy="steps",
        eval_steps=250,
        save_strategy="no",
        report_to="none",
        seed=opts.seed,
        max_length=128,
        padding_free=False,  # rows are short and alike: plain padded batches are faster here
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=valid, processing_class=tokenizer,
                         callbacks=_curve_callbacks(tokenizer, task, opts, opts.sft_steps))
    trainer.train()
    results["history"]["sft"] = trainer.state.log_history
    copy_file(os.path.join(out, "loss_curve.png"), os.path.join(opts.output_dir, "sft_loss_curve.png"))
    results["sft_train_loss"] = trainer.state.log_history[-1].get("train_loss")
    return trainer.model


STAGES["sft"] = _sft_stage


def _grpo_stage(model: Any, tokenizer: Any, task: Any, opts: QuickstartOptions, results: dict) -> Any:
    """The RL stage: GRPO on the arithmetic task's training prompts that SFT had no solutions for.

    The SFT model imitates a demonstrator that mostly skipped its reasoning: greedy, it mostly states a bare
    answer, which a tiny model gets wrong more often than not, yet its samples still work the columns now and
    then. Sampling ``grpo_generations`` completions per problem and rewarding only the right answer (built-in
    ``arithmetic``) and the answer format (``arithmetic_format``) moves it to the worked solutions that pay,
    which raises held-out greedy accuracy. It runs on the HF engine in the training process, for ``opts.grpo_steps``
    steps; the reward curve goes into ``results``."""
    from .files import copy_file
    from .trainers.grpo import GRPOConfig, GRPOTrainer

    prompts, _ = stage_split(task, opts, "prompt_only", "grpo")  # the problems SFT saw no solution of
    out = os.path.join(opts.output_dir, "grpo")
    config = GRPOConfig(
        output_dir=out,
        max_steps=opts.grpo_steps,
        learning_rate=opts.grpo_learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=0.1,
        num_generations=opts.grpo_generations,
        per_device_train_batch_size=opts.grpo_batch_size,
        temperature=opts.grpo_temperature,
        max_completion_length=64,
        max_prompt_length=64,
        beta=0.0,
        loss_type="dapo",
        weight_decay=0.0,
        logging_steps=5 if opts.grpo_steps >= 20 else 1,
        log_completions=True,
        log_completions_steps=max(1, opts.grpo_steps // 2),
        num_completions_to_print=3,
        save_strategy="no",
        report_to="none",
        seed=opts.seed,
    )
    rewards = list(getattr(opts, "grpo_rewards", ("arithmetic", "arithmetic_format")))
    trainer = GRPOTrainer(model, rewards, config, train_dataset=prompts, processing_class=tokenizer,
                          callbacks=_curve_callbacks(tokenizer, task, opts, opts.grpo_steps))
    trainer.train()
    results["history"]["grpo"] = trainer.state.log_history
    copy_file(os.path.join(out, "loss_curve.png"), os.path.join(opts.output_dir, "grpo_loss_curve.png"))
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    results["grpo_reward_first_log"] = rewards[0] if rewards else None
    results["grpo_reward_last_log"] = rewards[-1] if rewards else None
    results["grpo_seconds_split"] = {k: round(v, 1) for k, v in trainer.timings.items()}
    return trainer.model


STAGES["grpo"] = _grpo_stage


def plot_stages(history: dict[str, list[dict]], path: str) -> str | None:
    """One figure of what each stage optimizes: SFT loss, SFT token accuracy and held-out exact match, GRPO
    mean reward per reward function, GRPO held-out exact match."""
    from .plots import plot_panels

    sft, grpo = history.get("sft", []), history.get("grpo", [])
    return plot_panels([
        ("SFT: cross-entropy on the demonstrations", sft, ("loss", "eval_loss")),
        ("SFT: token accuracy, held-out exact match", sft, ("mean_token_accuracy", "heldout_exact_match")),
        ("GRPO: mean reward per function", grpo, ("rewards/*/mean", "reward")),
        ("GRPO: held-out exact match, completion length / 64", [
            {**e, **({"completions/mean_length / 64": e["completions/mean_length"] / 64}
                     if "completions/mean_length" in e else {})} for e in grpo],
         ("heldout_exact_match", "completions/mean_length / 64")),
    ], path)


def run_quickstart(opts: QuickstartOptions) -> dict[str, Any]:
    """Run the quickstart; returns (and saves as results.json) accuracies and times per stage."""
    from rich.console import Console
    from rich.table import Table

    from .models import build_tiny
    from .tasks import ArithmeticTask

    console = Console()
    start = time.time()
    os.makedirs(opts.output_dir, exist_ok=True)
    spec = opts.model.removeprefix("tiny:")
    model, tokenizer = build_tiny(spec, seed=opts.seed)
    task = ArithmeticTask(digits=opts.digits, seed=opts.seed)
    test = task.split(opts.train_size, opts.test_size, "prompt_only", "prompt_only")["test"]
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"[bold]posttrain quickstart[/]: {opts.model} ({n_params / 1e6:.1f}M parameters), "
                  f"{opts.digits}-digit addition, {opts.train_size} train / {opts.test_size} held-out problems")
    results: dict[str, Any] = {"options": asdict(opts), "accuracy": {}, "seconds": {}, "history": {}}
    results["accuracy"]["before"] = _evaluate(model, tokenizer, test)
    console.print(f"held-out exact-match accuracy before training: {results['accuracy']['before']:.1%}")
    for stage in opts.stages:
        if stage not in STAGES:
            raise ValueError(f"unknown quickstart stage {stage!r}; available: {', '.join(STAGES)}")
        t0 = time.time()
        model = STAGES[stage](model, tokenizer, task, opts, results)
        results["seconds"][stage] = round(time.time() - t0, 1)
        results["accuracy"][f"after_{stage}"] = _evaluate(model, tokenizer, test)
        console.print(f"held-out exact-match accuracy after {stage}: {results['accuracy'][f'after_{stage}']:.1%} "
                      f"({results['seconds'][stage]}s)")
    model_dir = os.path.join(opts.output_dir, "model")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    results["seconds"]["total"] = round(time.time() - start, 1)
    plot_stages(results["history"], os.path.join(opts.output_dir, "quickstart_curves.png"))
    with open(os.path.join(opts.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = Table(title="quickstart: held-out exact-match accuracy")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    for key, value in results["accuracy"].items():
        table.add_row(key, f"{value:.1%}")
    console.print(table)
    console.print(f"saved model to {model_dir}, curves and results.json to {opts.output_dir} "
                  f"({results['seconds']['total']:.0f}s in all)")
    return results


def quickstart_main(argv: Sequence[str]) -> int:
    """`posttrain quickstart [--output_dir DIR] [--stages sft,grpo] [--train_size N] ...`"""
    defaults = QuickstartOptions()
    parser = argparse.ArgumentParser(prog="posttrain quickstart", description=__doc__.split("\n\n")[0])
    for name, value in asdict(defaults).items():
        if name == "extra":
            continue
        if name == "stages":
            parser.add_argument("--stages", default=",".join(value), help="comma-separated stages, in order")
        else:
            parser.add_argument(f"--{name}", type=type(value), default=value)
    ns = vars(parser.parse_args(list(argv)))
    ns["stages"] = tuple(s for s in ns["stages"].split(",") if s)
    run_quickstart(QuickstartOptions(**ns))
    return 0
