"""``Linear``: ``nn.Linear`` (same parameters, same state-dict names) whose products over
a few rows run as ``W · xᵀ`` on the CPU.

A decode step over B sequences multiplies B rows by every weight. For 2-16 rows the
CPU's ``x · Wᵀ`` (what ``F.linear`` calls) is slower than one row: measured on this
machine's BLAS, one thread, the 49152 × 576 LM head at 2 rows 17.5 ms and at 8 rows
24 ms against 10 ms at one row, while ``W · xᵀ`` streams the weight once: 5.3 ms at 2
rows, 13 ms at 8 (``bench/micro``: ``test_few_row_lm_head``). At one row both are the same
matrix-vector product, bit for bit; from 17 rows on, and on other devices, ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 16  # at most this many rows go through W · xᵀ on the CPU


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if x.device.type != "cpu" or rows > FEW_ROWS:
            return F.linear(x, self.weight, self.bias)
        y = (self.weight @ x.reshape(rows, -1).T).T.contiguous()  # (rows, out), rows-major as F.linear
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1)
