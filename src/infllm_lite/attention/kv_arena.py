"""Rows of shared KV stores for the full-attention memories of an engine's sequences.

A decode step of B sequences with caches of their own attends in B calls per layer; with
their caches as rows of one tensor it attends in one batched matmul over the rows (the
K·qᵀ scores, a length mask, softmax, P·V). Measured on this 2-core CPU (8 sequences at
2K keys, 30 layers of distinct caches, 2 threads, medians of 9 rounds): 65 ms for the 240
separate flash-attention calls against 40-47 ms for 30 batched ones; a decode step of 8
sequences spends about half its time there.

A :class:`KVBank` holds ``rows`` caches of ``capacity`` tokens for every layer, in one
anonymous memory map on the CPU: pages are only backed by memory once written (a row's
resident size is what its sequence has read), and a freed row gives its pages back to the
system at once (``madvise(MADV_DONTNEED)``: they read as zeros afterwards). On other
devices a bank is an ordinary zeroed tensor. :class:`KVArena` hands out rows of banks by
capacity class (powers of two from 1024 tokens), opening a bank when every row of its
class is taken.
"""

from __future__ import annotations

import mmap

import torch

from ..config import ModelArgs

MIN_CAPACITY = 1024  # the smallest capacity class (tokens)
ROWS_PER_BANK = 16  # rows one bank holds at most
BANK_BYTES = 8 * 2**30  # the most address space one bank takes (its pages are backed lazily)


def capacity_class(capacity: int) -> int:
    """The power of two ≥ ``capacity`` (at least MIN_CAPACITY): the row size serving it."""
    return max(MIN_CAPACITY, 1 << (capacity - 1).bit_length())


class KVBank:
    """``rows`` KV caches of ``capacity`` tokens for each of ``args.n_layers`` layers:
    ``k[i]``/``v[i]`` (rows, Hkv, capacity, d) of layer ``i``."""

    def __init__(self, args: ModelArgs, rows: int, capacity: int, dtype: torch.dtype,
                 device: torch.device):
        self.rows, self.capacity = rows, capacity
        shape = (args.n_layers, 2, rows, args.n_kv_heads, capacity, args.head_dim)
        self._map = None
        if device.type == "cpu":
            itemsize = torch.empty((), dtype=dtype).element_size()
            n = 1
            for s in shape:
                n *= s
            self._map = mmap.mmap(-1, n * itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # zero pages until written
            store = torch.frombuffer(self._map, dtype=dtype).view(shape)
        else:
            store = torch.zeros(shape, dtype=dtype, device=device)
        self._store = store
        self.k = [store[i, 0] for i in range(args.n_layers)]  # each (rows, Hkv, C, d)
        self.v = [store[i, 1] for i in range(args.n_layers)]
        self.free = list(range(rows))

    def take(self) -> int | None:
        """The lowest free row (rows in use stay packed at the front), or None."""
        if not self.free:
            return None
        self.free.sort()
        return self.free.pop(0)

    def give(self, row: int) -> None:
        """Row ``row`` is free again; its pages go back to the system (zeros when next read)."""
        if self._map is not None:
            row_bytes = self._store[0, 0, 0].numel() * self._store.element_size()
            per_layer_kv = self.rows * row_bytes
            for block in range(self._store.shape[0] * 2):  # every (layer, k|v) slab
                start = block * per_layer_kv + row * row_bytes
                first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the row only
                last = (start + row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
                if last > first:
                    self._map.madvise(mmap.MADV_DONTNEED, first, last - first)
        else:
            self._store[:, :, row].zero_()
        self.free.append(row)


class ArenaRow:
    """One sequence's row of a bank: its layers' caches are ``k[i][row:row + 1]``."""

    def __init__(self, bank: KVBank, row: int):
        self.bank, self.row = bank, row

    def views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s cache of this row: k, v (1, Hkv, C, d) views."""
        return (self.bank.k[layer][self.row:self.row + 1], self.bank.v[layer][self.row:self.row + 1])

    def release(self) -> None:
        """Give the row back (idempotent)."""
        if self.bank is not None:
            self.bank.give(self.row)
            self.bank = None


class KVArena:
    """Rows for full-attention caches of one model, by capacity class."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype, device: torch.device | str):
        self.args, self.dtype, self.device = args, dtype, torch.device(device)
        self.banks: dict[int, list[KVBank]] = {}
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.token_bytes = 2 * args.n_layers * args.n_kv_heads * args.head_dim * itemsize

    def rows_per_bank(self, capacity: int) -> int:
        """How many rows of ``capacity_class(capacity)`` tokens a bank holds (0: too large
        a row for a bank; such a cache is a tensor of its own)."""
        return min(ROWS_PER_BANK, BANK_BYTES // (capacity_class(capacity) * self.token_bytes))

    def take(self, capacity: int) -> ArenaRow | None:
        """A free row of at least ``capacity`` tokens, or None where rows that large are
        not banked."""
        size = capacity_class(capacity)
        rows = self.rows_per_bank(size)
        if rows == 0:
            return None
        banks = self.banks.setdefault(size, [])
        for bank in banks:
            row = bank.take()
            if row is not None:
                return ArenaRow(bank, row)
        bank = KVBank(self.args, rows, size, self.dtype, self.device)
        banks.append(bank)
        return ArenaRow(bank, bank.take())
