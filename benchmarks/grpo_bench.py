"""GRPO throughput per rollout engine: completions/s, trained tokens/s, peak RSS, time split.

Model: `tiny:bench` by default (hidden 256, 4 layers, head_dim 64, vocabulary 32768), or `--model smollm2`
(SmolLM2-135M-Instruct, built once and cached), float32 weights on CPU; `--lora R` trains a rank-R LoRA adapter
on every linear layer (both sides), the reference then being the base with the adapter disabled.
Data: arithmetic-task prompts; rewards: the task's accuracy plus a cheap shaped reward. Each engine runs
``--warmup`` optimizer steps (not measured: vLLM start-up, first-call costs) then ``--steps`` measured
steps of ``--batch`` completions (``--generations`` per prompt, ``--max_completion_length`` tokens; a
random model rarely stops early, so completions are about full length). On the random model most groups
get the same reward for all their completions (advantage 0); by default (``skip_zero_advantage_backward``)
those run without gradients, which leaves the update unchanged; ``--backward-all-rows`` measures the
same work TRL does (a backward through every completion).

    python benchmarks/grpo_bench.py [--engines hf,vllm,server] [--steps 4] [--json out.json]
    python benchmarks/grpo_bench.py --async [--engines hf] [--threads 2]   # sync hf vs async, same run
    python benchmarks/grpo_bench.py --engines hf --peer trl [--peer_python PATH] [--threads 1]
    python benchmarks/grpo_bench.py --engines hf --model smollm2 --lora 16 --batch 16 --generations 4 \
        --max_completion_length 32 --steps 2 --peer trl

Engines: ``hf`` (HF generate on the training model), ``vllm`` (vLLM colocated in this process),
``server`` (a `posttrain serve --backend vllm` subprocess; its memory is included in peak RSS);
``async`` (``async_generation=True``: the trainer starts its own HF `posttrain serve` worker and trains on
what a producer thread queues; the trainer and the worker run one torch thread each), ``async-vllm``
(the same with a vLLM worker). ``--async`` adds ``async`` to the engines and reports its throughput
against the first synchronous engine's: on 2 cores, compare it with the synchronous run on ``--threads 2``.

``--peer trl`` then times TRL's GRPOTrainer (`benchmarks/peers/trl_grpo.py`, in the peer's own venv made by
`benchmarks/peers/make_venv.sh`) on the same exported model, prompts and settings, in the same run, and prints
the ratio against the first engine.

On a machine shared with other jobs, pass ``--threads 1``: with more torch threads than free cores,
OpenMP barriers wait on descheduled threads and HF generate ran ~7x slower (2 threads vs 1, measured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from common import RssSampler, load_bench_model, lora_settings, print_report, run_peer, side_by_side  # noqa: E402

PHASES = ("generate", "score", "prepare", "train", "sync")
ASYNC_PHASES = ("trainer_wait", "prepare", "train", "sync")  # what the training thread spends its time on


def digit_share(prompts: list, completions: list[str], **kwargs: object) -> list[float]:
    """A cheap shaped reward (share of digit characters), so groups have non-zero variance."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def run_engine(engine: str, args: argparse.Namespace, server_url: str | None) -> dict:
    from transformers import TrainerCallback

    from posttrain import GRPOConfig, GRPOTrainer
    from posttrain.tasks import ArithmeticTask

    model, tokenizer, _ = load_bench_model(args.model, seed=0)
    lora = lora_settings(args.lora)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(**lora)
    engine_fields = {"hf": {}, "vllm": dict(use_vllm=True, vllm_mode="colocate", vllm_kv_cache_gb=1.0),
                     "server": dict(use_vllm=True, vllm_mode="server", vllm_server_url=server_url),
                     "async": dict(async_generation=True, vllm_server_timeout=600),
                     "async-vllm": dict(async_generation=True, use_vllm=True, vllm_kv_cache_gb=1.0,
                                        vllm_server_timeout=600)}[engine]
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="grpo-bench-"), num_generations=args.generations,
        per_device_train_batch_size=args.batch, max_completion_length=args.max_completion_length,
        max_steps=args.warmup + args.steps, learning_rate=1e-5, logging_steps=1000, save_strategy="no",
        report_to="none", disable_tqdm=True, log_completions=False,
        skip_zero_advantage_backward=not args.backward_all_rows, **engine_fields,
    )
    data = ArithmeticTask(digits=3).prompt_only(args.batch * (args.warmup + args.steps))
    trainer = GRPOTrainer(model, ["arithmetic", digit_share], config, train_dataset=data, processing_class=tokenizer,
                          peft_config=peft_config)
    marks: dict[str, dict] = {}

    class Mark(TrainerCallback):
        def on_step_end(self, a: object, state: object, control: object, **kw: object) -> None:
            if state.global_step == args.warmup:
                marks["start"] = {"t": time.perf_counter(), **trainer.timings, **trainer.counts}

    trainer.add_callback(Mark())
    with RssSampler(children=True) as rss:
        trainer.train()
    end = {"t": time.perf_counter(), **trainer.timings, **trainer.counts}
    start = marks["start"]
    wall = end["t"] - start["t"]
    phases = ASYNC_PHASES if engine.startswith("async") else PHASES
    delta = {k: end.get(k, 0.0) - start.get(k, 0.0)
             for k in (*phases, "generator_idle", "completions", "completion_tokens", "trained_tokens",
                       "completions_without_backward", "async_dropped_stale_generations")}
    trainer.close()
    split = {p: round(delta[p], 2) for p in phases}
    split["other (optimizer, logging)"] = round(wall - sum(delta[p] for p in phases), 2)
    out = {
        "completions/s": delta["completions"] / wall,
        "trained tokens/s": delta["trained_tokens"] / wall,
        "seconds (measured steps)": round(wall, 2),
        "time split (s)": split,
        "share of completions with advantage 0 run without backward":
            round(delta["completions_without_backward"] / max(delta["completions"], 1), 3),
        "peak RSS (GiB, with children)": rss.peak_bytes / 2**30,
    }
    if engine.startswith("async"):
        out["trainer wait (s)"] = round(delta["trainer_wait"], 2)
        out["generator idle (s)"] = round(delta["generator_idle"], 2)
        out["stale generations dropped"] = delta["async_dropped_stale_generations"]
        out["worker start (s, not measured)"] = round(end.get("worker_start", 0.0), 2)
    else:
        out["generated tokens/s (generate phase)"] = delta["completion_tokens"] / max(delta["generate"], 1e-9)
    return out


def export_for_peer(args: argparse.Namespace) -> None:
    """Save exactly what `run_engine` trains on, so a peer library can be timed on the same inputs."""
    from posttrain.tasks import ArithmeticTask

    model, tokenizer, _ = load_bench_model(args.model, seed=0)
    model.save_pretrained(os.path.join(args.export, "model"))
    tokenizer.save_pretrained(os.path.join(args.export, "model"))
    data = ArithmeticTask(digits=3).prompt_only(args.batch * (args.warmup + args.steps))
    with open(os.path.join(args.export, "prompts.jsonl"), "w") as f:
        for row in data:
            f.write(json.dumps({"prompt": row["prompt"], "answer": row["answer"]}) + "\n")
    with open(os.path.join(args.export, "settings.json"), "w") as f:
        json.dump({"batch": args.batch, "generations": args.generations,
                   "max_completion_length": args.max_completion_length, "lora": lora_settings(args.lora)}, f)
    print(f"exported model, prompts and settings to {args.export}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="hf,vllm,server")
    parser.add_argument("--model", default="tiny:bench", help="tiny:<spec> or smollm2")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tune)")
    parser.add_argument("--steps", type=int, default=4, help="measured optimizer steps per engine")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured first steps")
    parser.add_argument("--batch", type=int, default=32, help="completions per step")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max_completion_length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--backward-all-rows", action="store_true",
                        help="skip_zero_advantage_backward=False: run every completion with gradients, as TRL does")
    parser.add_argument("--async", dest="run_async", action="store_true",
                        help="also run async GRPO (own HF worker) and report its speed-up over the first engine")
    parser.add_argument("--json", default=None)
    parser.add_argument("--peer", choices=["trl"], default=None, help="also time TRL on the same inputs")
    parser.add_argument("--peer_python", default=None, help="the peer venv's python (default benchmarks/peers/.venv-trl)")
    parser.add_argument("--export", default=None,
                        help="write the model, prompts and settings here for benchmarks/peers/trl_grpo.py and stop")
    args = parser.parse_args()
    if args.export:
        export_for_peer(args)
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict = {"settings": {"model": args.model, "LoRA rank": args.lora, "completions/step": args.batch, "generations": args.generations,
                                 "max_completion_length": args.max_completion_length, "measured steps": args.steps,
                                 "torch threads": torch.get_num_threads()}}
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.run_async and "async" not in engines:
        engines.append("async")
    for engine in engines:
        server = None
        try:
            if engine == "server":
                from _server_helpers import start_server

                served = "smollm2-135m-instruct" if args.model == "smollm2" else args.model
                server = start_server("--model", served, "--backend", "vllm", "--kv-cache-gb", "1")
            report[engine] = run_engine(engine, args, server.url if server else None)
        except Exception as err:  # noqa: BLE001 - one engine failing (e.g. no vLLM) must not hide the others
            report[engine] = {"error": f"{type(err).__name__}: {err}"[:300]}
        finally:
            if server is not None:
                server.stop()
    sync = next((e for e in engines if not e.startswith("async")), None)
    for name in (e for e in engines if e.startswith("async")):
        if sync and "completions/s" in report.get(sync, {}) and "completions/s" in report.get(name, {}):
            report[f"{name} vs {sync}"] = {"throughput ratio": report[name]["completions/s"] /
                                           report[sync]["completions/s"]}
    if args.peer and engines:
        args.export = tempfile.mkdtemp(prefix="grpo-peer-")
        export_for_peer(args)
        extra = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
        extra += ["--threads", str(args.threads)] if args.threads else []
        peer = run_peer("trl_grpo.py", args.export, args.peer_python, extra)
        ours = dict(report.get(engines[0], {}))
        ours["peak RSS (GiB)"] = ours.get("peak RSS (GiB, with children)")
        report["peer"] = peer
        report["side by side"] = side_by_side(ours, {"completions/s": peer["trl completions/s"],
                                                     "peak RSS (GiB)": peer["peak RSS (GiB)"]},
                                              [("completions/s", "completions/s", True),
                                               ("peak RSS (GiB)", "peak RSS (GiB)", False)])
    print_report(report, title="GRPO throughput by rollout engine")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
