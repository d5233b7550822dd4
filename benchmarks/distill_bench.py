"""Distillation throughput and memory, posttrain against TRL 1.16, on the same models, data and settings.

Two modes, each run in a fresh process per library (so peak RSS is that run's alone):

- ``gkd``: GKD on dataset completions (``lmbda=0``, ``beta=0.5``): posttrain's `GKDTrainer` against TRL's
  ``trl.experimental.gkd.GKDTrainer``. Every step is a student forward + backward and a teacher forward on
  the same rows, so the two do the same work.
- ``distill``: on-policy distillation (``beta=1``, reverse KL): posttrain's `DistillationTrainer` against
  ``trl.DistillationTrainer``; the student samples ``--max_completion_length`` tokens (HF generate on both).

Models: the student is `tiny:bench` (hidden 256, 4 layers, vocabulary 32768, untied head), the teacher the
same depth and vocabulary, twice as wide (hidden 512, 8 heads). Data: 3-digit arithmetic conversations.
``--warmup`` steps are not measured; then ``--steps`` steps of ``--batch`` sequences. Tokens/s counts the
prompt and completion tokens of the trained sequences (TRL's from its logged completion lengths).

    python benchmarks/distill_bench.py [--modes gkd,distill] [--steps 3] [--threads 1] \
        [--peer-python /work/peers/trl116/bin/python] [--json out.json]

Without ``--peer-python`` (or when that interpreter lacks trl) only posttrain's figures are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_report  # noqa: E402

STUDENT = "bench"
TEACHER = "hidden=512,layers=4,heads=8,vocab=32768,tie=0"
PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", "trl_distill.py")


def export(folder: str, args: argparse.Namespace) -> dict:
    """Student, teacher (with the tokenizer) and rows for both libraries; returns the settings."""
    from posttrain.data import tokenize_prompt_completion
    from posttrain.models import build_tiny
    from posttrain.tasks import ArithmeticTask

    student, tok = build_tiny(STUDENT, seed=0)
    teacher, _ = build_tiny(TEACHER, seed=1)
    for name, model in (("student", student), ("teacher", teacher)):
        model.save_pretrained(os.path.join(folder, name))
        tok.save_pretrained(os.path.join(folder, name))
    rows = ArithmeticTask(digits=3, conversational=True).prompt_completion(args.batch * (args.warmup + args.steps))
    lengths = []
    with open(os.path.join(folder, "rows.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n")
            ids = tokenize_prompt_completion(tok, r["prompt"], r["completion"])
            lengths.append((len(ids["prompt_ids"]), len(ids["completion_ids"])))
    settings = {"batch": args.batch, "warmup": args.warmup, "steps": args.steps, "temperature": 1.0, "beta": args.beta,
                "lmbda": 0.0, "max_completion_length": args.max_completion_length,
                "mean_prompt_tokens": sum(p for p, _ in lengths) / len(lengths),
                "mean_completion_tokens": sum(c for _, c in lengths) / len(lengths)}
    with open(os.path.join(folder, "settings.json"), "w") as f:
        json.dump(settings, f)
    return settings


def posttrain_worker(folder: str, mode: str, threads: int | None) -> None:
    """One posttrain run on the exported inputs; prints a JSON object like the peer script's."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from posttrain import DistillationConfig, DistillationTrainer, GKDConfig, GKDTrainer

    if threads:
        torch.set_num_threads(threads)
    s = json.load(open(os.path.join(folder, "settings.json")))
    rows = [json.loads(line) for line in open(os.path.join(folder, "rows.jsonl"))]
    student = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "student"), dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "teacher"), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, "student"))
    common = dict(output_dir=tempfile.mkdtemp(prefix=f"posttrain-{mode}-"), per_device_train_batch_size=s["batch"],
                  max_steps=s["warmup"] + s["steps"], learning_rate=1e-5, logging_steps=10_000, save_strategy="no",
                  report_to="none", disable_tqdm=True, use_cpu=True, bf16=False, temperature=s["temperature"])
    if mode == "gkd":
        config = GKDConfig(lmbda=s["lmbda"], beta=s["beta"], max_new_tokens=s["max_completion_length"], **common)
        data = Dataset.from_list([{"messages": r["prompt"] + r["completion"]} for r in rows])
        trainer = GKDTrainer(student, teacher, config, train_dataset=data, processing_class=tokenizer)
    else:
        config = DistillationConfig(beta=s["beta"], max_completion_length=s["max_completion_length"], **common)
        data = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
        trainer = DistillationTrainer(student, teacher, config, train_dataset=data, processing_class=tokenizer)
    marks: dict = {}

    class Mark(TrainerCallback):
        def on_step_end(self, a: object, state: object, control: object, **kw: object) -> None:
            if state.global_step == s["warmup"]:
                marks.update(t=time.perf_counter(), tokens=trainer.counts["tokens"])

    trainer.add_callback(Mark())
    trainer.train()
    wall = time.perf_counter() - marks["t"]
    print(json.dumps({"seconds": wall, "tokens": trainer.counts["tokens"] - marks["tokens"],
                      "torch threads": torch.get_num_threads(),
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def _run(cmd: list[str]) -> dict:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1][:300] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _figures(out: dict, s: dict, mode: str) -> dict:
    if "error" in out:
        return out
    if "tokens" not in out:  # the peer: tokens from the data (gkd) or its logged completion lengths (distill)
        per_step = [s["mean_completion_tokens"]] * s["steps"] if mode == "gkd" else \
            [h.get("completions/mean_length", s["max_completion_length"]) for h in out["logs"]]
        out["tokens"] = sum(s["batch"] * (s["mean_prompt_tokens"] + c) for c in per_step)
    return {"tokens/s": out["tokens"] / out["seconds"],
            "sequences/s": s["batch"] * s["steps"] / out["seconds"],
            "seconds (measured steps)": round(out["seconds"], 2),
            "peak RSS (GiB)": out["peak_rss_bytes"] / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="gkd,distill")
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured first steps")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--max_completion_length", type=int, default=96,
                        help="gkd: the cut of dataset completions (above their length); distill: tokens sampled")
    parser.add_argument("--distill_completion_length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every run")
    parser.add_argument("--peer-python", default=None, help="Python of a venv with trl 1.16 installed")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        posttrain_worker(args.worker[0], args.worker[1], args.threads)
        return
    threads = ["--threads", str(args.threads)] if args.threads else []
    report: dict = {"settings": {"student": f"tiny:{STUDENT}", "teacher": f"tiny:{TEACHER}", "batch": args.batch,
                                 "measured steps": args.steps, "torch threads": args.threads or "torch default"}}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        folder = tempfile.mkdtemp(prefix=f"distill-bench-{mode}-")
        length = args.max_completion_length if mode == "gkd" else args.distill_completion_length
        s = export(folder, argparse.Namespace(**{**vars(args), "max_completion_length": length,
                                                 "beta": 0.5 if mode == "gkd" else 1.0}))
        section = {"posttrain": _figures(_run([sys.executable, os.path.abspath(__file__), "--worker", folder, mode,
                                               *threads]), s, mode)}
        if args.peer_python:
            section["trl 1.16"] = _figures(_run([args.peer_python, PEER, folder, "--mode", mode, *threads]), s, mode)
            ours, peer = section["posttrain"], section["trl 1.16"]
            if "tokens/s" in ours and "tokens/s" in peer:
                section["posttrain / trl"] = {"throughput": ours["tokens/s"] / peer["tokens/s"],
                                              "peak RSS": ours["peak RSS (GiB)"] / peer["peak RSS (GiB)"]}
        report[f"{mode} (mean prompt {s['mean_prompt_tokens']:.0f} tokens, completion "
               f"{s['mean_completion_tokens'] if mode == 'gkd' else length:.0f})"] = section
    print_report(report, title="Distillation: posttrain vs TRL 1.16")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
