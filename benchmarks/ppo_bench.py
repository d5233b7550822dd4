"""PPO throughput: completions/s, peak RSS and the generate / value / train split, against our GRPO on the
same work, and (``--export``) the inputs for TRL 1.12's PPOTrainer (benchmarks/peers/trl_ppo.py).

Model: `tiny:bench` (as grpo_bench.py), float32 on CPU, HF engine. Reward: a sequence-classification
reward model on the same backbone size (random head), so PPO, GRPO and TRL's PPO all score with one
model forward; PPO's critic is initialized from it (TRL's recipe). Each step is ``--batch`` completions of
``--max_completion_length`` tokens: PPO samples one per prompt, GRPO ``--generations`` per prompt (the same
tokens generated and trained). ``--ppo_epochs`` passes per generation (TRL's default is 4; 1 matches GRPO).

    python benchmarks/ppo_bench.py [--steps 4] [--threads 1] [--json out.json]
    python benchmarks/ppo_bench.py --export /tmp/ppo-peer     # then benchmarks/peers/trl_ppo.py /tmp/ppo-peer
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RssSampler, print_report  # noqa: E402

PHASES = ("generate", "score", "prepare", "train")


def _inputs(args: argparse.Namespace):
    from posttrain.models import build_tiny
    from posttrain.models.loading import load_model
    from posttrain.tasks import ArithmeticTask

    model, tokenizer = build_tiny(args.model.removeprefix("tiny:"), seed=0)
    reward_model = load_model(args.model, task="seq-cls")
    data = ArithmeticTask(digits=3).prompt_only(args.batch * (args.warmup + args.steps))
    return model, tokenizer, reward_model, data


def run(method: str, args: argparse.Namespace) -> dict:
    from transformers import TrainerCallback

    from posttrain import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer

    model, tokenizer, reward_model, data = _inputs(args)
    common = dict(output_dir=tempfile.mkdtemp(prefix=f"{method}-bench-"), per_device_train_batch_size=args.batch,
                  max_steps=(args.warmup + args.steps) * (args.ppo_epochs if method == "ppo" else 1),
                  learning_rate=1e-5, logging_steps=1000, save_strategy="no", report_to="none", disable_tqdm=True,
                  log_completions=False)
    if method == "ppo":
        config = PPOConfig(response_length=args.max_completion_length, num_ppo_epochs=args.ppo_epochs,
                           temperature=1.0, **common)
        trainer = PPOTrainer(config, tokenizer, model, None, reward_model, data, None)
    else:
        config = GRPOConfig(num_generations=args.generations, max_completion_length=args.max_completion_length,
                            skip_zero_advantage_backward=False, **common)
        trainer = GRPOTrainer(model, reward_model, config, train_dataset=data, processing_class=tokenizer,
                              reward_processing_classes=tokenizer)
    marks: dict[str, dict] = {}
    warm_steps = args.warmup * (args.ppo_epochs if method == "ppo" else 1)

    class Mark(TrainerCallback):
        def on_step_end(self, a: object, state: object, control: object, **kw: object) -> None:
            if state.global_step == warm_steps:
                marks["start"] = {"t": time.perf_counter(), **trainer.timings, **trainer.counts}

    trainer.add_callback(Mark())
    with RssSampler(children=True) as rss:
        trainer.train()
    end = {"t": time.perf_counter(), **trainer.timings, **trainer.counts}
    start = marks["start"]
    wall = end["t"] - start["t"]
    delta = {k: end.get(k, 0.0) - start.get(k, 0.0) for k in (*PHASES, "value", "completions", "trained_tokens")}
    split = {"generate": delta["generate"], "score (reward model)": delta["score"],
             "value (critic forward)": delta["value"],
             "prepare (old/ref log-probs)": delta["prepare"] - delta["value"], "train": delta["train"]}
    split = {k: round(v, 2) for k, v in split.items()}
    split["other (optimizer, logging)"] = round(wall - sum(delta[p] for p in PHASES), 2)
    return {"completions/s": delta["completions"] / wall, "trained tokens/s": delta["trained_tokens"] / wall,
            "seconds (measured steps)": round(wall, 2), "time split (s)": split,
            "peak RSS (GiB, with children)": rss.peak_bytes / 2**30}


def export_for_peer(args: argparse.Namespace) -> None:
    """Save exactly what `run` trains on (policy, reward model, prompts, settings) for TRL's PPOTrainer."""
    model, tokenizer, reward_model, data = _inputs(args)
    for name, m in (("model", model), ("reward_model", reward_model)):
        m.save_pretrained(os.path.join(args.export, name))
        tokenizer.save_pretrained(os.path.join(args.export, name))
    with open(os.path.join(args.export, "prompts.jsonl"), "w") as f:
        for row in data:
            f.write(json.dumps({"prompt": row["prompt"]}) + "\n")
    with open(os.path.join(args.export, "settings.json"), "w") as f:
        json.dump({"batch": args.batch, "max_completion_length": args.max_completion_length,
                   "ppo_epochs": args.ppo_epochs}, f)
    print(f"exported policy, reward model, prompts and settings to {args.export}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="ppo,grpo")
    parser.add_argument("--model", default="tiny:bench")
    parser.add_argument("--steps", type=int, default=4, help="measured generations per method")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured first generations")
    parser.add_argument("--batch", type=int, default=32, help="completions per generation")
    parser.add_argument("--generations", type=int, default=8, help="GRPO's completions per prompt")
    parser.add_argument("--max_completion_length", type=int, default=64)
    parser.add_argument("--ppo_epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--export", default=None, help="write the inputs for benchmarks/peers/trl_ppo.py and stop")
    args = parser.parse_args()
    if args.export:
        export_for_peer(args)
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict = {"settings": {"model": args.model, "completions/generation": args.batch,
                                 "max_completion_length": args.max_completion_length, "ppo epochs": args.ppo_epochs,
                                 "measured generations": args.steps, "torch threads": torch.get_num_threads()}}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        report[method] = run(method, args)
    if "completions/s" in report.get("ppo", {}) and "completions/s" in report.get("grpo", {}):
        report["ppo vs grpo"] = {"throughput ratio": report["ppo"]["completions/s"] / report["grpo"]["completions/s"]}
    print_report(report, title="PPO vs GRPO throughput (HF engine)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
