"""Peak RSS of SFT on a generated language-modeling dataset: streamed (`IterableDataset`) against in memory.

Each (mode, rows) case runs in a fresh interpreter: SFT with packing on `tiny:nano`, a few optimizer steps, and
(streamed) one full pass of the data path (validation, tokenization, bounded-buffer packing, collation) over every
row of the stream. The in-memory path tokenizes and packs every row before training starts. Printed: peak RSS
(VmHWM) of the process and its growth over the RSS after imports, and the wall time.

    PYTHONPATH=$PWD python benchmarks/streaming_memory.py [--rows 20000 200000] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

CASE = textwrap.dedent("""
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    from datasets import Dataset, IterableDataset, disable_progress_bars
    import posttrain as pt
    disable_progress_bars()

    def kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])

    mode, rows, steps, cache = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

    def gen(n):
        for i in range(n):
            a, b = (i * 7919) % 1000, (i * 104729) % 1000
            yield {"text": f"Row {i}: the sum of {a} and {b} is {a + b}, and their difference is {a - b}."}

    base = kib("VmRSS")
    start = time.time()
    if mode == "stream":
        data = IterableDataset.from_generator(gen, gen_kwargs={"n": rows})
    else:
        data = Dataset.from_generator(gen, gen_kwargs={"n": rows}, cache_dir=cache)
    args = pt.SFTConfig(output_dir=cache + "/run", max_steps=steps, per_device_train_batch_size=8, packing=True,
                        max_length=512, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=steps)
    trainer = pt.SFTTrainer("tiny:nano", args, train_dataset=data)
    trainer.train()
    seen = 0
    if mode == "stream":  # the whole stream through the data path: validate, tokenize, pack, collate
        for batch in trainer.get_train_dataloader():
            seen += len(batch["seq_lens"])
    print(json.dumps({"mode": mode, "rows": rows, "peak_mib": kib("VmHWM") / 1024,
                      "growth_mib": (kib("VmHWM") - base) / 1024, "seconds": time.time() - start,
                      "sequences_streamed": seen, "truncated": trainer._totals.get("data/train/truncated_rows")}))
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cache", default="/tmp/posttrain-streaming-memory")
    opts = parser.parse_args()
    results = []
    for rows in opts.rows:
        for mode in ("stream", "memory"):
            out = subprocess.run([sys.executable, "-c", CASE, mode, str(rows), str(opts.steps), f"{opts.cache}/{mode}{rows}"],
                                 capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(result)
            print(f"{mode:>6} {rows:>7} rows: peak RSS {result['peak_mib']:7.1f} MiB (+{result['growth_mib']:6.1f} over "
                  f"imports), {result['seconds']:6.1f} s" + (f", {result['sequences_streamed']} sequences streamed"
                                                           if mode == "stream" else ""), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
