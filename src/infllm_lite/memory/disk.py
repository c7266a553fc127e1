"""``DiskStore``: the disk tier of the block pool, an append-only file of fixed-size byte
records, memory-mapped (``numpy.memmap``) and grown by doubling.

Records are raw bytes, so any dtype (bfloat16 included, which numpy lacks) comes back
bit-identical. The file lives in ``directory`` or, when that is None, in a fresh temporary
directory; either way the file (and the temporary directory) is removed on ``close()``,
when the store is garbage-collected, or at interpreter exit (``weakref.finalize``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref

import numpy as np
import torch

from ..errors import InfLLMLiteError

MIN_RECORDS = 16  # first file size, in records


def _remove(path: str, tmpdir: str | None) -> None:
    """Finalizer: delete the file and the temporary directory (never the user's)."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    if tmpdir is not None:
        shutil.rmtree(tmpdir, ignore_errors=True)


class DiskStore:
    """Fixed-size byte records ``0, 1, 2, ...`` in one memory-mapped file."""

    def __init__(self, record_nbytes: int, directory: str | None = None) -> None:
        if record_nbytes <= 0:
            raise InfLLMLiteError(f"record size must be positive, got {record_nbytes}")
        if directory is not None and not os.path.isdir(directory):
            raise InfLLMLiteError(f"offload_dir {directory!r} is not a directory; create it first")
        self.record_nbytes = record_nbytes
        self.tmpdir = tempfile.mkdtemp(prefix="infllm-offload-") if directory is None else None
        fd, self.path = tempfile.mkstemp(prefix="infllm-blocks-", suffix=".bin",
                                         dir=self.tmpdir or directory)
        os.close(fd)
        self._finalizer = weakref.finalize(self, _remove, self.path, self.tmpdir)
        self._map: np.memmap | None = None  # (capacity, record_nbytes) uint8
        self.capacity = 0  # records the file has room for

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    @property
    def nbytes(self) -> int:
        """Size of the file on disk."""
        return self.capacity * self.record_nbytes

    def write(self, first: int, records: torch.Tensor) -> None:
        """Store ``records`` (m, record_nbytes) uint8 (CPU) as records ``first .. first+m-1``."""
        self._check_open()
        m = records.shape[0]
        if records.dtype != torch.uint8 or records.shape != (m, self.record_nbytes):
            raise InfLLMLiteError(f"disk records must be uint8 (m, {self.record_nbytes}), "
                                  f"got {records.dtype} {tuple(records.shape)}")
        if m == 0:
            return
        self._reserve(first + m)
        self._map[first:first + m] = records.cpu().contiguous().numpy()

    def read(self, ids: list[int], out: torch.Tensor) -> torch.Tensor:
        """Records ``ids`` into ``out`` (len(ids), record_nbytes) uint8 CPU (pinned or not)."""
        self._check_open()
        if ids:
            if max(ids) >= self.capacity or min(ids) < 0:
                raise InfLLMLiteError(f"disk records {ids} outside the file ({self.capacity} records)")
            np.take(self._map, ids, axis=0, out=out.numpy())
        return out

    def close(self) -> None:
        """Unmap and delete the file (and the temporary directory). Idempotent."""
        self._map = None
        self._finalizer()

    def _reserve(self, n_records: int) -> None:
        """Grow the file to hold ``n_records`` records (amortised doubling) and remap it."""
        if n_records <= self.capacity:
            return
        capacity = max(n_records, 2 * self.capacity, MIN_RECORDS)
        self._map = None  # drop the old mapping before resizing
        os.truncate(self.path, capacity * self.record_nbytes)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r+",
                              shape=(capacity, self.record_nbytes))
        self.capacity = capacity

    def _check_open(self) -> None:
        if self.closed:
            raise InfLLMLiteError("the block pool's disk tier is closed")
