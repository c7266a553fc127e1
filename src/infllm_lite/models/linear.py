"""``Linear``: ``nn.Linear`` (same parameters, same state-dict names) whose CPU products
run on a weight packed once for oneDNN, where a probe finds that faster.

Decoding multiplies a few rows (one per sequence) by every weight. The CPU's BLAS repacks
the weight on every call of ``x · Wᵀ`` and slows down past one row; oneDNN's inner product on a weight
reordered once into its blocked layout streams it as it is. Measured on this machine
(AMD EPYC, AVX-512, one thread, 90 weights of 1536 × 576 so none stays in cache): 1 row
36 ms (``F.linear``) against 22 (oneDNN), 8 rows 57 against 21, a 512-row prefill chunk
11.1 against 4.6 ms. Its rows are independent: a row's output is the same bits at 1 to
16 rows (what lets a batched decode step equal the sequence alone), and within float32
rounding of ``F.linear`` (different summation order).

Which kernel runs is resolved once per process (:func:`cpu_linear_kernel`): a short
probe on the first CPU product, or ``INFLLM_LITE_CPU_LINEAR=onednn|blas`` (``blas``:
``W · xᵀ``, what ran before oneDNN; its rows are not independent to the bit). The packed
copy is made on a weight's first product and remade when the weight changes; it costs
one more copy of the weights in memory. Gradients, ``torch.compile`` and other dtypes
take ``W · xᵀ`` as before; other devices ``F.linear``, and so do products over more
than ``FEW_ROWS`` rows (prefill), which stay bit for bit what they were (oneDNN is 2.4x faster there too, but its summation
order moves the embedded model's logits up to 1.5e-4 from transformers' on a 300-token
prompt, past the parity tests' 1e-4).
"""

from __future__ import annotations

import copy
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InfLLMLiteError

CPU_LINEAR_KERNELS = ("onednn", "blas")
_ENV = "INFLLM_LITE_CPU_LINEAR"
FEW_ROWS = 16  # products over at most this many rows (decode steps) take the chosen kernel
_chosen: str | None = None


def _onednn(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _probe() -> str:
    """``onednn`` if its product beats ``F.linear`` at 1 and at 8 rows on a decoder-sized
    weight here (medians of a few calls), else ``blas``."""
    if not torch.backends.mkldnn.is_available():
        return "blas"
    with torch.inference_mode():
        weights = [torch.randn(1536, 576) for _ in range(8)]  # 28 MB: mostly out of cache
        packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]

        def median_seconds(f) -> float:
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                f()
                times.append(time.perf_counter() - t0)
            return sorted(times)[3]

        for rows in (1, 8):
            x = torch.randn(rows, 576)
            blas = median_seconds(lambda: [F.linear(x, w) for w in weights])
            onednn = median_seconds(lambda: [_onednn(x, p, None) for p in packed])
            if onednn >= blas:
                return "blas"
    return "onednn"


def _checked(kernel: str, where: str) -> str:
    if kernel not in CPU_LINEAR_KERNELS:
        raise InfLLMLiteError(f"{where}: choose one of {', '.join(CPU_LINEAR_KERNELS)}")
    return kernel


def cpu_linear_kernel() -> str:
    """The CPU product kernel of this process: ``onednn`` or ``blas`` (see the module)."""
    global _chosen
    if _chosen is None:
        forced = os.environ.get(_ENV)
        _chosen = _probe() if forced is None else _checked(forced, f"{_ENV}={forced!r}")
    return _chosen


def chosen_cpu_linear_kernel() -> str | None:
    """The CPU product kernel if this process has settled it (a product ran), else None."""
    return _chosen


def set_cpu_linear_kernel(kernel: str | None) -> None:
    """Choose the CPU product kernel (``onednn`` / ``blas``), or None to probe again."""
    global _chosen
    _chosen = None if kernel is None else _checked(kernel, f"unknown CPU linear kernel {kernel!r}")


class Linear(nn.Linear):
    _packed: torch.Tensor | None = None
    _packed_from: tuple | None = None  # (data_ptr, version) of the weight it was packed from

    def __deepcopy__(self, memo) -> "Linear":
        """A copy without the oneDNN copy of the weight (an opaque tensor deepcopy cannot
        copy; the copy packs its own on first use)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = None if key in ("_packed", "_packed_from") else copy.deepcopy(value, memo)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.numel() > FEW_ROWS * x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        if self._onednn_applies(x):
            return _onednn(x, self.packed_weight(), self.bias)
        return self._few_rows_blas(x)

    def _onednn_applies(self, x: torch.Tensor) -> bool:
        """float32 inference outside ``torch.compile``, on a machine that chose oneDNN."""
        w = self.weight
        return (w.dtype == x.dtype == torch.float32
                and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
                and not torch.compiler.is_compiling() and cpu_linear_kernel() == "onednn")

    def _few_rows_blas(self, x: torch.Tensor) -> torch.Tensor:
        """``W · xᵀ``: BLAS's ``x · Wᵀ`` packs the whole weight past one row (the LM head
        17.5 ms at 2 rows against 10 at one, 1 thread); ``W · xᵀ`` streams it once. Its
        output is made row-major as F.linear's (a transposed one went wrong downstream)."""
        rows = x.numel() // x.shape[-1]
        y = (self.weight @ x.reshape(rows, -1).T).T.contiguous()  # (rows, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1)

    def packed_weight(self) -> torch.Tensor:
        """The weight in oneDNN's layout, packed on first use and again when it changes."""
        w = self.weight
        key = (w.data_ptr(), None if w.is_inference() else w._version)
        if self._packed_from != key:
            with torch.inference_mode():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach())
            self._packed_from = key
        return self._packed
