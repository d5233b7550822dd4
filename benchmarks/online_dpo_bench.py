"""Online DPO throughput: completions/s and peak RSS on the GRPO benchmark's model, prompts and settings.

Model: `tiny:bench` (as `grpo_bench.py`), float32 on CPU; prompts: 3-digit arithmetic; 2 completions per
prompt, ``--batch`` completions per optimizer step, ``--max_new_tokens`` tokens; rewards: the task's accuracy
plus the share of digits (TRL 1.16's OnlineDPOTrainer takes reward functions only, so the peer ranks the
pairs with the same two); ``--warmup`` unmeasured steps, then ``--steps`` measured ones.

    python benchmarks/online_dpo_bench.py [--steps 4] [--threads 1] [--json out.json]
    python benchmarks/online_dpo_bench.py --export /tmp/odpo-peer      # the same inputs, for the peer:
    /work/peers/trl116/bin/python benchmarks/peers/trl_online_dpo.py /tmp/odpo-peer [--steps 4] [--threads 1]
    python benchmarks/online_dpo_bench.py --peer /work/peers/trl116/bin/python   # both, side by side

``--method xpo|nash_md`` times posttrain's XPO or Nash-MD on the same inputs instead (their last TRL release
is 1.12, whose trainers take one reward model, not functions: no like-for-like peer run here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RssSampler, print_report  # noqa: E402
from grpo_bench import digit_share  # noqa: E402


def _prompts(args: argparse.Namespace):
    from posttrain.tasks import ArithmeticTask

    return ArithmeticTask(digits=3).prompt_only(args.batch * (args.warmup + args.steps))


def run(args: argparse.Namespace) -> dict:
    from transformers import TrainerCallback

    import posttrain
    from posttrain.models import build_tiny

    config_cls = {"online_dpo": posttrain.OnlineDPOConfig, "xpo": posttrain.XPOConfig, "nash_md": posttrain.NashMDConfig}
    trainer_cls = {"online_dpo": posttrain.OnlineDPOTrainer, "xpo": posttrain.XPOTrainer,
                   "nash_md": posttrain.NashMDTrainer}
    model, tokenizer = build_tiny(args.model.removeprefix("tiny:"), seed=0)
    config = config_cls[args.method](
        output_dir=tempfile.mkdtemp(prefix="odpo-bench-"), per_device_train_batch_size=args.batch,
        max_new_tokens=args.max_new_tokens, max_steps=args.warmup + args.steps, learning_rate=1e-5,
        logging_steps=1000, save_strategy="no", report_to="none", disable_tqdm=True, log_completions=False)
    trainer = trainer_cls[args.method](model, reward_funcs=["arithmetic", digit_share], args=config,
                                       train_dataset=_prompts(args), processing_class=tokenizer)
    marks: dict = {}

    class Mark(TrainerCallback):
        def on_step_end(self, a: object, state: object, control: object, **kw: object) -> None:
            if state.global_step == args.warmup:
                marks["start"] = {"t": time.perf_counter(), **trainer.timings}

    trainer.add_callback(Mark())
    with RssSampler(children=True) as rss:
        trainer.train()
    wall = time.perf_counter() - marks["start"]["t"]
    split = {p: round(trainer.timings[p] - marks["start"].get(p, 0.0), 2) for p in ("generate", "score", "prepare", "train")}
    return {"completions/s": args.steps * args.batch / wall, "seconds (measured steps)": round(wall, 2),
            "time split (s)": split, "peak RSS (GiB, with children)": rss.peak_bytes / 2**30}


def export_for_peer(args: argparse.Namespace) -> None:
    """Write the model, the prompts and the settings `run` uses, for benchmarks/peers/trl_online_dpo.py."""
    from posttrain.models import build_tiny

    model, tokenizer = build_tiny(args.model.removeprefix("tiny:"), seed=0)
    model.save_pretrained(os.path.join(args.export, "model"))
    tokenizer.save_pretrained(os.path.join(args.export, "model"))
    with open(os.path.join(args.export, "prompts.jsonl"), "w") as f:
        for row in _prompts(args):
            f.write(json.dumps({"prompt": row["prompt"], "answer": row["answer"]}) + "\n")
    with open(os.path.join(args.export, "settings.json"), "w") as f:
        json.dump({"batch": args.batch, "max_new_tokens": args.max_new_tokens}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="online_dpo", choices=("online_dpo", "xpo", "nash_md"))
    parser.add_argument("--model", default="tiny:bench")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32, help="completions per step (2 per prompt)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--export", default=None, help="write the inputs for the peer script here and stop")
    parser.add_argument("--peer", default=None, help="a TRL 1.16 venv's python: run the peer too, side by side")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.export:
        export_for_peer(args)
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict = {"settings": {"model": args.model, "method": args.method, "completions/step": args.batch,
                                 "max_new_tokens": args.max_new_tokens, "measured steps": args.steps,
                                 "torch threads": torch.get_num_threads()}}
    report["posttrain"] = run(args)
    if args.peer:
        folder = tempfile.mkdtemp(prefix="odpo-peer-")
        args.export = folder
        export_for_peer(args)
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", "trl_online_dpo.py")
        cmd = [args.peer, script, folder, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        try:
            peer = json.loads(out.stdout[out.stdout.rindex('{\n  "trl'):])  # after the Trainer's own log lines
        except ValueError:
            peer = {"error": (out.stderr or out.stdout)[-500:]}
        report["trl 1.16 OnlineDPOTrainer"] = peer
        if "trl completions/s" in peer:
            ours = report["posttrain"]
            report["posttrain vs trl"] = {
                "throughput ratio": ours["completions/s"] / peer["trl completions/s"],
                "peak RSS ratio": ours["peak RSS (GiB, with children)"] / peer["peak RSS (GiB)"]}
    print_report(report, title=f"{args.method} throughput")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
