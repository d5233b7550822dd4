"""DPO throughput and memory on a benchmark-shaped or real model, with posttrain's defaults.

Model: `--model bench` (default; `tiny:bench`: hidden 256, 4 layers, head_dim 64, vocabulary 32768) or
`--model smollm2` (SmolLM2-135M-Instruct, built once and cached), float32 weights on CPU; `--lora R` trains a
rank-R LoRA adapter on every linear layer, and the reference is then the base model with the adapter disabled
(no second copy, on both sides).
Data: conversational preference pairs (prompt 5-60 words, chosen and rejected 10-200 words each), batch 8
pairs, max length 512, one epoch, `DPOConfig` defaults otherwise (sigmoid loss, a frozen copy of the initial
model as reference, chosen and rejected packed into one padding-free forward). Prints real (non-pad) tokens/s,
seconds per step, peak RSS and model-FLOPs utilization against an fp32 matmul peak measured in the same run.
Tokens count every prompt+chosen and prompt+rejected sequence once; FLOPs count the policy's forward and
backward plus the reference forward on each of them.

    python benchmarks/dpo_bench.py [--rows 64] [--precompute_ref_log_probs 0|1] [--json out.json]
    python benchmarks/dpo_bench.py --peer trl [--peer_python PATH] [--threads 1]
    python benchmarks/dpo_bench.py --model smollm2 --lora 16 --rows 16 --peer trl

``--peer trl`` also trains TRL's DPOTrainer (`benchmarks/peers/trl_dpo.py`, in the peer's own venv made by
`benchmarks/peers/make_venv.sh`) on the same model folder, pairs and settings, right after posttrain in the same
run, and prints both figures with their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    BENCH_MODELS, best_matmul_peak, export_for_peer, load_bench_model, lora_settings, make_preference_chat_dataset,
    model_flops_per_token, peak_rss_bytes, print_report, run_peer, side_by_side, step_timer,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(BENCH_MODELS), default="bench")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tune)")
    parser.add_argument("--rows", type=int, default=64, help="preference pairs in the epoch")
    parser.add_argument("--batch_size", type=int, default=8, help="pairs per step")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--padding_free", type=int, default=None, help="override the default (1)")
    parser.add_argument("--precompute_ref_log_probs", type=int, default=None, help="override the default (0)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--peer", choices=["trl"], default=None, help="also time TRL on the same inputs")
    parser.add_argument("--peer_python", default=None, help="the peer venv's python (default benchmarks/peers/.venv-trl)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on both sides")
    parser.add_argument("--peer_bf16", type=int, default=None,
                        help="set TRL's bf16 (default: TRL's own default, True, which a CPU without native bf16 emulates)")
    args = parser.parse_args()

    import torch

    from posttrain import DPOConfig, DPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    peaks = best_matmul_peak()
    peak_flops = peaks["best"]
    model, tokenizer, description = load_bench_model(args.model, seed=0)
    lora = lora_settings(args.lora)
    data = make_preference_chat_dataset(args.rows, seed=0)
    peer_folder = tempfile.mkdtemp(prefix="dpo-peer-") if args.peer else None
    if peer_folder:  # before training: the peer starts from the same weights
        export_for_peer(peer_folder, model, tokenizer, data.to_list(),
                        {"batch_size": args.batch_size, "max_length": args.max_length, "peer_bf16": args.peer_bf16,
                         "lora": lora})
    overrides = {}
    if args.padding_free is not None:
        overrides["padding_free"] = bool(args.padding_free)
    if args.precompute_ref_log_probs is not None:
        overrides["precompute_ref_log_probs"] = bool(args.precompute_ref_log_probs)
    output_dir = tempfile.mkdtemp(prefix="dpo-bench-")
    config = DPOConfig(
        output_dir=output_dir, per_device_train_batch_size=args.batch_size, max_length=args.max_length,
        num_train_epochs=1, save_strategy="no", report_to="none", logging_steps=1000, disable_tqdm=True,
        ref_logps_cache_dir=os.path.join(output_dir, "ref_cache"), **overrides,
    )
    setup_start = time.perf_counter()
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(**lora)
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config)
    setup = time.perf_counter() - setup_start
    rows = trainer.train_dataset
    real_tokens = sum(2 * len(p) + len(c) + len(r)
                      for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"]))
    seq_len = real_tokens / (2 * len(rows))

    timer = step_timer()
    trainer.add_callback(timer)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    tokens_per_s = real_tokens / wall
    # Policy forward + backward on every token; the reference forward too unless it was precomputed.
    flops_per_token = model_flops_per_token(model.config, seq_len, training=True, frozen=bool(lora))
    if not config.precompute_ref_log_probs:
        flops_per_token += model_flops_per_token(model.config, seq_len, training=False)
    steps = trainer.state.global_step
    s_per_step = wall / max(steps, 1)
    median = sorted(timer.times)[len(timer.times) // 2] if timer.times else None
    rss_gb = peak_rss_bytes() / 1e9
    figures = {
        "model": description,
        "params (M)": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "trained": f"LoRA r={args.lora}" if lora else "all weights",
        "bf16 autocast": config.bf16,
        "padding_free": config.padding_free,
        "precompute_ref_log_probs": config.precompute_ref_log_probs,
        "pairs": len(rows),
        "steps": steps,
        "real tokens (both sequences of each pair)": real_tokens,
        "mean sequence length": round(seq_len, 1),
        "setup incl. tokenization (s)": round(setup, 2),
        "epoch wall time (s)": round(wall, 2),
        "s/step (epoch mean)": round(s_per_step, 3),
        "median step time (s)": round(median, 3) if median is not None else None,
        "real tokens/s": round(tokens_per_s, 1),
        "peak RSS (GB)": round(rss_gb, 3),
        "matmul peak fp32 (GFLOP/s)": round(peaks["fp32"] / 1e9, 1),
        "matmul peak bf16 (GFLOP/s)": round(peaks["bf16"] / 1e9, 1),
        "model GFLOP/s": round(tokens_per_s * flops_per_token / 1e9, 1),
        "MFU": f"{100 * tokens_per_s * flops_per_token / peak_flops:.1f}%",
        "torch threads": torch.get_num_threads(),
    }
    print_report(figures, title="posttrain DPO benchmark")
    if peer_folder:
        extra = ["--threads", str(args.threads)] if args.threads else []
        peer = run_peer("trl_dpo.py", peer_folder, args.peer_python, extra)
        figures["peer"] = peer
        figures["side by side"] = side_by_side(figures, peer, [("real tokens/s", "real tokens/s", True),
                                                               ("peak RSS (GB)", "peak RSS (GB)", False)])
        print_report(peer, title=f"TRL {peer['trl']} DPO, same model, data and settings")
        print_report(figures["side by side"], title="side by side (>1x: posttrain ahead)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
