"""Rows of shared stores for the attention memories of an engine's sequences.

A decode step of B sequences whose memories are tensors of their own attends in B calls
per layer; with their memories as rows of one tensor it attends in one batched matmul
over the rows. Measured on this 2-core CPU (full attention, 8 sequences at 2K keys, 30
layers of distinct caches, 2 threads, medians of 9 rounds): 65 ms for the 240 separate
flash-attention calls against 40-47 ms for 30 batched ones; a decode step of 8 sequences
spends about half its time there. InfLLM's per-sequence decode is mostly small ops (about
100 per sequence and layer), which a batched step replaces by one set per layer.

A :class:`RowBank` holds ``rows`` rows of named tensors (each row its own ``shape``) for
every layer, in one anonymous private memory map on the CPU: pages are backed by memory
only once written (a row's resident size is what its sequence wrote), and a freed row
gives its pages back to the system at once (``madvise(MADV_DONTNEED)``: they read as
zeros afterwards). On other devices a bank is an ordinary zeroed tensor. :class:`Arena`
hands out rows of banks by kind (a memory mode and what fixes its shapes: a full cache's
capacity class, an InfLLM memory's config), opening a bank when every row of its kind is
taken.
"""

from __future__ import annotations

import math
import mmap
from typing import Hashable

import torch

MIN_CAPACITY = 1024  # the smallest full-attention capacity class (tokens)
ROWS_PER_BANK = 16  # rows one bank holds at most
BANK_BYTES = 8 * 2**30  # the most address space one bank takes (its pages are backed lazily)


def capacity_class(capacity: int) -> int:
    """The power of two ≥ ``capacity`` (at least MIN_CAPACITY): the row size serving it."""
    return max(MIN_CAPACITY, 1 << (capacity - 1).bit_length())


class RowBank:
    """``rows`` rows of the named tensors ``shapes`` for each of ``n_layers`` layers:
    ``slab(i, name)`` is (rows, *shapes[name]) of layer ``i``."""

    def __init__(self, n_layers: int, shapes: dict[str, tuple[int, ...]], rows: int,
                 dtype: torch.dtype, device: torch.device):
        self.rows = rows
        sizes = {name: math.prod(shape) for name, shape in shapes.items()}
        total = n_layers * rows * sum(sizes.values())
        self._map = None
        if device.type == "cpu":
            itemsize = torch.empty((), dtype=dtype).element_size()
            self._map = mmap.mmap(-1, total * itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            flat = torch.frombuffer(self._map, dtype=dtype)  # zero pages until written
        else:
            flat = torch.zeros(total, dtype=dtype, device=device)
        self._slabs, self._spans, at = [], [], 0  # spans: (first element, row elements) per slab
        for _ in range(n_layers):
            layer = {}
            for name, shape in shapes.items():
                n = rows * sizes[name]
                layer[name] = flat[at:at + n].view(rows, *shape)
                self._spans.append((at, sizes[name]))
                at += n
            self._slabs.append(layer)
        self._flat = flat
        self.free = list(range(rows))

    def slab(self, layer: int, name: str) -> torch.Tensor:
        return self._slabs[layer][name]

    def views(self, layer: int, row: int) -> dict[str, torch.Tensor]:
        """Layer ``layer``'s tensors of row ``row``, each (1, *shape)."""
        return {name: t[row:row + 1] for name, t in self._slabs[layer].items()}

    def take(self) -> int | None:
        """The lowest free row (rows in use stay packed at the front), or None."""
        if not self.free:
            return None
        self.free.sort()
        return self.free.pop(0)

    def give(self, row: int) -> None:
        """Row ``row`` is free again; its pages go back to the system (zeros when next read)."""
        if self._map is None:
            for layer in self._slabs:
                for t in layer.values():
                    t[row].zero_()
        else:
            per_page = mmap.PAGESIZE // self._flat.element_size()  # elements per page
            for first, size in self._spans:
                lo, hi = first + row * size, first + (row + 1) * size  # the row's elements
                a, b = -(-lo // per_page) * per_page, hi // per_page * per_page  # its whole pages
                if b > a:
                    self._map.madvise(mmap.MADV_DONTNEED, a * self._flat.element_size(),
                                      (b - a) * self._flat.element_size())
                    self._flat[lo:a].zero_()  # the pages it shares with its neighbours
                    self._flat[b:hi].zero_()
                else:
                    self._flat[lo:hi].zero_()
        self.free.append(row)


class ArenaRow:
    """One memory's row of a bank."""

    def __init__(self, bank: RowBank, row: int):
        self.bank, self.row = bank, row

    def views(self, layer: int) -> dict[str, torch.Tensor]:
        """Layer ``layer``'s tensors of this row, each (1, *shape)."""
        return self.bank.views(layer, self.row)

    def release(self) -> None:
        """Give the row back (idempotent)."""
        if self.bank is not None:
            self.bank.give(self.row)
            self.bank = None


class Arena:
    """Rows for the attention memories of one model's sequences, by kind."""

    def __init__(self, n_layers: int, device: torch.device | str):
        self.n_layers, self.device = n_layers, torch.device(device)
        self.banks: dict[Hashable, list[RowBank]] = {}

    def take(self, kind: Hashable, shapes: dict[str, tuple[int, ...]],
             dtype: torch.dtype = torch.float32) -> ArenaRow | None:
        """A free row of the bank of ``kind`` (rows of the tensors ``shapes`` per layer; the
        same kind always has the same shapes), or None where a row is too large for a bank
        (such a memory keeps tensors of its own)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        row_bytes = self.n_layers * sum(math.prod(s) for s in shapes.values()) * itemsize
        rows = min(ROWS_PER_BANK, BANK_BYTES // row_bytes)
        if rows == 0:
            return None
        banks = self.banks.setdefault((kind, dtype), [])
        for bank in banks:
            row = bank.take()
            if row is not None:
                return ArenaRow(bank, row)
        bank = RowBank(self.n_layers, shapes, rows, dtype, self.device)
        banks.append(bank)
        return ArenaRow(bank, bank.take())


def attend_by_bank(layers: list, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend_group) -> torch.Tensor:
    """One layer's decode step of B memories (each layer's ``row`` an :class:`ArenaRow` or
    None): ``attend_group(layers', q', k', v')`` once for the memories that are rows of
    one bank, and once for each other memory alone; their outputs (B', H, 1, d) scattered
    back to the batch's order. q: (B, H, 1, d), k/v: (B, Hkv, 1, d)."""
    groups: dict[object, list[int]] = {}
    for b, layer in enumerate(layers):
        groups.setdefault(("bank", id(layer.row.bank)) if layer.row is not None else b, []).append(b)
    if len(groups) == 1:
        return attend_group(layers, q, k, v)
    out = torch.empty_like(q)  # (B, H, 1, d)
    for rows in groups.values():
        index = torch.tensor(rows, device=q.device)
        out[index] = attend_group([layers[b] for b in rows], q[index], k[index], v[index])
    return out
