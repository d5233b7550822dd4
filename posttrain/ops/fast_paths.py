"""Which CPU speed paths are on, and whether this CPU multiplies faster in bf16 than in float32.

The CPU speed paths (oneDNN weight packing for skinny products against a large weight, the one-slot pool for
kept softmax probabilities, the hand-written KV-cache decode step, pinning glibc's mmap threshold) give the same
results up to float rounding and are chosen at run time from what the hardware supports. One config field,
`cpu_fast_paths`, turns all of them off for a run: the trainers enter `cpu_fast_paths(args.cpu_fast_paths)`
around training, evaluation and prediction. The switch is a context variable, so it is scoped to the code
inside the `with` block (and to the thread that entered it) and never left behind as a global side effect;
outside any block the paths are on.

`cpu_bf16_is_fast()` answers once per process whether bf16 matrix products beat float32 here: only CPUs with
native bf16 dot products (AVX512_BF16 or AMX) can, and on those it times both dtypes on the same product to be
sure. On AVX2-only CPUs bf16 is emulated and several times slower, so no probe is run there.

`head_precision(dtype)` sets the dtype the output head's matrix products run in (the chunked log-softmax and
divergences, forward and backward): under mixed precision (``bf16=True``) the trainers enter it with bf16, so
the head, the largest matmul of a small model, runs at the bf16 rate too; the products' inputs are cast, the
logits come back in float32 and every softmax, log-sum-exp and loss sum stays in float32. ``None`` (outside any
block, and with ``cast_lm_head_to_fp32``) keeps the products in float32.
Only torch is imported here (see docs/internals.md).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

__all__ = ["cpu_fast_paths", "fast_paths_enabled", "cpu_bf16_is_fast", "cpu_has_native_bf16", "head_precision",
           "head_matmul_dtype"]

_ENABLED: ContextVar[bool] = ContextVar("posttrain_cpu_fast_paths", default=True)
_HEAD_DTYPE: ContextVar[torch.dtype | None] = ContextVar("posttrain_head_matmul_dtype", default=None)

# bf16 must beat float32 by this much on the probe to be chosen: mixed precision costs casts and fp32 heads.
_BF16_MIN_SPEEDUP = 1.3


def fast_paths_enabled() -> bool:
    """Whether the CPU speed paths may be taken here (True unless inside `cpu_fast_paths(False)`)."""
    return _ENABLED.get()


@contextmanager
def cpu_fast_paths(enabled: bool = True) -> Iterator[None]:
    """Turn the CPU speed paths on or off for the code inside the block (restored on exit)."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def head_matmul_dtype() -> torch.dtype | None:
    """The dtype the output head's products run in here (None: the inputs' own float32/float64)."""
    return _HEAD_DTYPE.get()


@contextmanager
def head_precision(dtype: torch.dtype | None) -> Iterator[None]:
    """Run the output head's products in ``dtype`` (bf16 or fp16; None for float32) inside the block."""
    if dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"head_precision takes torch.bfloat16, torch.float16 or None, not {dtype}")
    token = _HEAD_DTYPE.set(dtype)
    try:
        yield
    finally:
        _HEAD_DTYPE.reset(token)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU flags list native bf16 dot products (``avx512_bf16`` or ``amx_bf16``). `cpuinfo`: the
    text of /proc/cpuinfo (read when None; False where it cannot be read)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _matmul_seconds(dtype: torch.dtype, size: int, repeats: int) -> float:
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up: oneDNN/MKL pick their kernels on the first call
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=1)
def cpu_bf16_is_fast(size: int = 1024, repeats: int = 3) -> bool:
    """Whether bf16 matrix products run at least 1.3x faster than float32 on this CPU (once per process)."""
    if not cpu_has_native_bf16():
        return False
    fp32 = _matmul_seconds(torch.float32, size, repeats)
    bf16 = _matmul_seconds(torch.bfloat16, size, repeats)
    return fp32 >= _BF16_MIN_SPEEDUP * bf16
