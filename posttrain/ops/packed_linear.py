"""``h W^T`` for many small row blocks against one large CPU weight, on oneDNN with the weight packed once.

An LM head is one big ``[V, H]`` matrix multiplied, again and again, by a few rows at a time: ``B`` rows per
decode step, 128-row chunks in the chunked log-softmax. MKL's sgemm does these skinny products far below the
matmul peak on some CPUs, where oneDNN with the weight packed once (a reorder into its blocked layout, a copy
of the weight) runs them about twice as fast; packing costs a few products' time, so it pays from a few
products on: once per rollout for the decode loop's head, once per forward for the log-softmax chunks. Large
row blocks gain nothing, and backward's products (``[N, V] x [V, H]`` and ``[V, N] x [N, H]``) stay on MKL.
The measurements: benchmarks/README.md.

`PackedLinear` takes this path for a float32 CPU weight of at least ``MIN_PACKED_ELEMENTS`` when PyTorch's
oneDNN ops are present and agree with ``torch.mm`` on a probe (checked once per process); anything else
(GPUs, bf16, small weights, a PyTorch without oneDNN) multiplies as usual. The config field
``cpu_fast_paths=False`` turns the path off (`posttrain.ops.fast_paths`). The two paths sum in different orders, so logits differ in the last float32 bits.
Only torch is imported here (see docs/internals.md).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .fast_paths import fast_paths_enabled

__all__ = ["PackedLinear", "onednn_linear_available", "MIN_PACKED_ELEMENTS", "MIN_PACKED_PROJECTION_ELEMENTS",
           "low_precision_mm"]

MIN_PACKED_ELEMENTS = 1 << 20  # weights below ~4 MiB of float32: MKL's own blocking is as fast, packing is not
# A decode step's projections (``B`` rows against a ``[out, in]`` weight, packed once per rollout): from about
# 512 x 512 on, oneDNN beat MKL's ``F.linear`` at 32 rows (benchmarks/README.md).
MIN_PACKED_PROJECTION_ELEMENTS = 1 << 18
_MAX_PACKED_ROWS = 1024  # from about 2048 rows on, MKL matched oneDNN


@functools.lru_cache(maxsize=1)
def onednn_linear_available() -> bool:
    """Whether oneDNN's packed linear ops exist here and match ``torch.mm`` (probed once per process)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        weight, rows = torch.randn(96, 40, generator=gen), torch.randn(5, 40, generator=gen)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 5)
        out = torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "")
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return out.shape == (5, 96) and torch.allclose(out, rows @ weight.T, rtol=1e-4, atol=1e-4)


def low_precision_mm(a: Tensor, b: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``a @ b`` with both inputs cast to ``dtype`` (bf16/fp16: the matmul accumulates in float32) and the product
    back in ``a``'s dtype; a plain ``a @ b`` when ``dtype`` is None or the inputs are float64 (exact tests)."""
    if dtype is None or a.dtype == torch.float64:
        return a @ b
    return (a.to(dtype) @ b.to(dtype)).to(a.dtype)


class PackedLinear:
    """``h -> h W^T (+ b)`` for row blocks ``h [n, H]`` of about ``rows`` rows; ``weight [V, H]`` must not change
    while this object is in use (pack again after an optimizer step)."""

    def __init__(self, weight: Tensor, rows: int, bias: Tensor | None = None,
                 min_elements: int | None = None, matmul_dtype: torch.dtype | None = None) -> None:
        """Packs ``weight`` when it is a float32 CPU matrix of at least ``min_elements`` (default
        ``MIN_PACKED_ELEMENTS``) and ``rows`` is at most 1024; otherwise calls multiply as usual. With
        ``matmul_dtype`` (bf16/fp16, for a float32 weight) the products run in that dtype, from one cast copy
        of the weight, and the output is float32."""
        self.weight, self.bias = weight, bias
        self.packed: Tensor | None = None
        self.low: Tensor | None = None
        if matmul_dtype is not None and weight.dtype == torch.float32:
            self.low = weight.detach().to(matmul_dtype)
            return
        if _worth_packing(weight, rows, MIN_PACKED_ELEMENTS if min_elements is None else min_elements):
            with torch.no_grad():
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), int(rows))

    def __call__(self, hidden: Tensor, out: Tensor | None = None) -> Tensor:
        """``[n, H]`` (any float dtype) -> ``[n, V]`` in the weight's dtype. The plain path writes into ``out``
        when given (the packed one returns a new tensor). No autograd through the packed path: call it under
        ``no_grad`` or inside an ``autograd.Function``."""
        if self.low is not None:
            z = (hidden.to(self.low.dtype) @ self.low.T).to(self.weight.dtype)
            if self.bias is not None:
                z += self.bias
            return z
        hidden = hidden.to(self.weight.dtype)
        if self.packed is not None and hidden.shape[0] > 0:
            return torch.ops.mkldnn._linear_pointwise(hidden.contiguous(), self.packed, self.bias, "none", [], "")
        z = torch.mm(hidden, self.weight.T, out=out)
        if self.bias is not None:
            z += self.bias
        return z


def _worth_packing(weight: Tensor, rows: int, min_elements: int) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.numel() >= min_elements and 0 < rows <= _MAX_PACKED_ROWS
            and fast_paths_enabled() and onednn_linear_available())
