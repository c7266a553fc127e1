"""``BlockPool``: one layer's formed memory blocks in three tiers (SPEC §7).

A block is the K and the V of ``block_size`` tokens, each (B, Hkv, block_size, d). Blocks
get logical ids 0, 1, 2, ... in the order they are appended and never change.

* **Fast tier**: ``slot_k`` / ``slot_v`` (B, Hkv, n_slots, block_size, d) on ``device``
  (the GPU, or CPU memory when there is none); the InfLLM layer gives ``n_slots =
  max(max_cached_blocks, batch · topk)`` (every sequence's top-k resident at once). The
  InfLLM layer passes views into its attention slot array (``fast_k``/``fast_v``, float32
  there), so a loaded block is where the attention reads it: no per-chunk gather. A page
  table maps logical block -> slot (-1 when not resident) and slot -> block. The
  attention points its kv indices at slots (``ensure_resident`` / ``slots_of``).
* **Slow tier**: the authoritative copy of every block in host memory, a ring of rows
  (capacity, B, Hkv, block_size, d) per K/V, block ``i`` in row ``i % capacity``, grown by
  doubling (pinned when ``device`` is CUDA, so host->device copies can be asynchronous).
* **Disk tier**: with ``max_host_bytes`` set, the host ring holds at most that many bytes
  (K and V); older blocks move to a memory-mapped file (:class:`.disk.DiskStore`). The
  tiers split the ids: blocks ``[0, n_disk)`` on disk, ``[n_disk, n_blocks)`` in host.

Cache policy, per chunk: ``ensure_resident(selection)`` loads the selection's misses,
evicting residents outside the selection (never one of it). ``lru`` evicts the least
recently selected; ``lru-s`` the lowest value, where ``record_chunk(selection, mass)``
multiplies every resident value by ``score_decay`` and adds each selected block's attention
mass; a block enters with value 0 (ties: least recently selected first). Unlike the
reference, which resets a re-selected block's value to 0, a hit keeps its value (SPEC §7
"decays ... and gains").

For a later GPU integration: the page table, the recency ticks and the eviction choice are
host-side Python here, so ``ensure_resident`` reads the selection on the host (one sync per
chunk and layer; the reference does the same). ``slot_score`` already lives on the device,
so ``record_chunk`` adds the masses without a sync; the scores are read back only when an
``lru-s`` eviction must choose. To go sync-free, keep a (n_blocks,) page table and the
ticks on the device, find misses with tensor ops, and pick victims with ``topk`` over slot
keys, with a host-side upper bound on misses to size the copies. With batch > 1 each
sequence selects its own blocks: pass the union (at most n_slots blocks) or keep one pool
per sequence.
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass, fields, replace
from typing import Iterable, Sequence

import torch

from ..errors import InfLLMLiteError
from ..memory_config import MemoryConfig
from ..options import CACHE_POLICIES
from .disk import DiskStore

MIN_HOST_BLOCKS = 16  # first host ring capacity, when unlimited


@dataclass
class PoolStats:
    """Counters of one pool. ``blocks == blocks_host + blocks_disk``; ``blocks_fast`` are
    cached copies of blocks that also live in host or disk."""

    hits: int = 0  # selected blocks already resident
    misses: int = 0  # selected blocks loaded into a slot
    evictions: int = 0  # resident blocks dropped to make room
    chunks: int = 0  # ensure_resident calls
    bytes_slow_to_fast: int = 0  # K+V copied into slots (from host or disk)
    bytes_disk_to_host: int = 0  # K+V read from the offload file (loads and reads)
    bytes_host_to_disk: int = 0  # K+V written to the offload file
    blocks: int = 0
    blocks_fast: int = 0
    blocks_host: int = 0
    blocks_disk: int = 0

    def __add__(self, other: "PoolStats") -> "PoolStats":
        """Counters of several pools (e.g. all layers) added up."""
        return PoolStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __sub__(self, other: "PoolStats") -> "PoolStats":
        """What happened between two snapshots (the block counts are the later ones')."""
        counts = {"blocks", "blocks_fast", "blocks_host", "blocks_disk"}
        return PoolStats(**{f.name: getattr(self, f.name) - (0 if f.name in counts else getattr(other, f.name))
                            for f in fields(self)})

    @property
    def hit_rate(self) -> float:
        """Share of selected blocks found resident (0 before any selection)."""
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0


class BlockPool:
    """One layer's formed blocks: fast-tier slots, host store, disk overflow, cache policy."""

    def __init__(self, batch: int, n_kv_heads: int, block_size: int, head_dim: int, *,
                 n_slots: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, policy: str = "lru",
                 score_decay: float = 0.1, max_host_bytes: int | None = None,
                 offload_dir: str | None = None, fast_k: torch.Tensor | None = None,
                 fast_v: torch.Tensor | None = None) -> None:
        for name, value in (("batch", batch), ("n_kv_heads", n_kv_heads), ("block_size", block_size),
                            ("head_dim", head_dim), ("n_slots", n_slots)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InfLLMLiteError(f"BlockPool: {name} must be a positive integer, got {value!r}")
        if policy not in CACHE_POLICIES:
            raise InfLLMLiteError(f"BlockPool: policy must be one of {', '.join(CACHE_POLICIES)}, got {policy!r}")
        if not 0 <= score_decay <= 1:
            raise InfLLMLiteError(f"BlockPool: score_decay must be in [0, 1], got {score_decay}")
        if max_host_bytes is not None and (not isinstance(max_host_bytes, int)
                                           or isinstance(max_host_bytes, bool) or max_host_bytes <= 0):
            raise InfLLMLiteError(f"BlockPool: max_host_bytes must be a positive integer or None, "
                                  f"got {max_host_bytes!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = dtype
        self.block_shape = (batch, n_kv_heads, block_size, head_dim)
        self.n_slots = n_slots
        self.policy = policy
        self.score_decay = float(score_decay)
        self.block_nbytes = batch * n_kv_heads * block_size * head_dim * dtype.itemsize  # K or V
        self.max_host_bytes = max_host_bytes
        # host ring capacity limit in blocks (K and V count); 0: every block goes to disk
        self.host_limit = None if max_host_bytes is None else max_host_bytes // (2 * self.block_nbytes)
        self.offload_dir = offload_dir
        if offload_dir is not None:
            if not os.path.isdir(offload_dir):
                raise InfLLMLiteError(f"offload_dir {offload_dir!r} is not a directory; create it first")
        self._pin = self.device.type == "cuda"
        self._side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

        B, Hkv, bs, d = self.block_shape
        # fast tier: given (views into the attention's key/value slots) or allocated
        if (fast_k is None) != (fast_v is None):
            raise InfLLMLiteError("BlockPool: give both fast_k and fast_v, or neither")
        if fast_k is None:
            fast_k = torch.zeros(B, Hkv, n_slots, bs, d, dtype=dtype, device=self.device)
            fast_v = torch.zeros_like(fast_k)
        for name, x in (("fast_k", fast_k), ("fast_v", fast_v)):
            if tuple(x.shape) != (B, Hkv, n_slots, bs, d) or x.device != self.device \
                    or not x.dtype.is_floating_point:
                raise InfLLMLiteError(f"BlockPool: {name} must be a floating (B, Hkv, n_slots, "
                                      f"block_size, d) = {(B, Hkv, n_slots, bs, d)} tensor on "
                                      f"{self.device}, got {x.dtype} {tuple(x.shape)} on {x.device}")
        self.slot_k, self.slot_v = fast_k, fast_v  # may hold a wider dtype than the host copy
        self.slot_score = torch.zeros(n_slots, dtype=torch.float32, device=self.device)  # lru-s value
        self._slot_of: list[int] = []  # logical block -> slot, -1 if not resident
        self._block_of = [-1] * n_slots  # slot -> logical block, -1 if free
        self._tick = [0] * n_slots  # slot -> clock of its block's last selection
        self._clock = 0
        # slow tier: block i in row i % capacity
        self._host_k = self._host_empty(0)  # (capacity, B, Hkv, bs, d)
        self._host_v = self._host_empty(0)
        self.n_blocks = 0
        self.n_disk = 0  # blocks [0, n_disk) live on disk
        self._disk: DiskStore | None = None  # created on the first spill
        self._stats = PoolStats()
        self._closed = False

    @classmethod
    def from_config(cls, config: MemoryConfig, *, batch: int, n_kv_heads: int, head_dim: int,
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                    n_layers: int = 1) -> "BlockPool":
        """A pool for one of ``n_layers`` layers; ``config.max_host_bytes`` is shared equally."""
        host = None if config.max_host_bytes is None else max(1, config.max_host_bytes // n_layers)
        return cls(batch, n_kv_heads, config.block_size, head_dim, n_slots=config.max_cached_blocks,
                   dtype=dtype, device=device, policy=config.cache_policy,
                   score_decay=config.score_decay, max_host_bytes=host, offload_dir=config.offload_dir)

    # ------------------------------------------------------------------ appending

    def append(self, k: torch.Tensor, v: torch.Tensor) -> range:
        """Add formed blocks, k/v (B, Hkv, n_new, block_size, d); returns their logical ids."""
        self._check_open()
        B, Hkv, bs, d = self.block_shape
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor):
                raise InfLLMLiteError(f"append: {name} must be a tensor, got {type(x).__name__}")
            if x.dim() != 5 or (x.shape[0], x.shape[1], x.shape[3], x.shape[4]) != (B, Hkv, bs, d):
                raise InfLLMLiteError(f"append: {name} must be (B, Hkv, n_new, block_size, d) = "
                                      f"({B}, {Hkv}, n_new, {bs}, {d}), got {tuple(x.shape)}")
            if x.dtype != self.dtype:
                raise InfLLMLiteError(f"append: {name} has dtype {x.dtype}, the pool stores {self.dtype}")
        if k.shape != v.shape:
            raise InfLLMLiteError(f"append: k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
        n = k.shape[2]
        first, total = self.n_blocks, self.n_blocks + n
        host_count = total if self.host_limit is None else min(self.host_limit, total)
        new_disk = total - host_count  # blocks [0, new_disk) will be on disk
        # 1. spill the oldest host blocks
        spill_end = min(new_disk, first)
        if spill_end > self.n_disk:
            rows = self._rows(range(self.n_disk, spill_end))
            self._write_disk(self.n_disk, self._host_k.index_select(0, rows),
                             self._host_v.index_select(0, rows))
        # 2. new blocks already too old for the host go straight to disk
        if new_disk > first:
            m = new_disk - first
            self._write_disk(first, k[:, :, :m].permute(2, 0, 1, 3, 4).cpu(),
                             v[:, :, :m].permute(2, 0, 1, 3, 4).cpu())
        # 3. make room in the host ring (live old blocks: [max(new_disk, n_disk), first))
        self._grow_host(host_count, range(max(new_disk, self.n_disk), first))
        self.n_disk = new_disk
        # 4. the newest blocks into the host ring
        start = max(first, new_disk)
        if total > start:
            rows = self._rows(range(start, total))
            j = start - first
            self._host_k.index_copy_(0, rows, k[:, :, j:].permute(2, 0, 1, 3, 4).to("cpu"))
            self._host_v.index_copy_(0, rows, v[:, :, j:].permute(2, 0, 1, 3, 4).to("cpu"))
        self._slot_of.extend([-1] * n)
        self.n_blocks = total
        return range(first, total)

    # ------------------------------------------------------------------ fast tier

    def ensure_resident(self, block_ids: "torch.Tensor | Sequence[int]") -> torch.Tensor:
        """Make the chunk's selection resident; returns its slots (len,) int64 on ``device``.

        Misses load from host or disk into free slots, then into slots of evicted blocks
        (per policy, never one of ``block_ids``). Afterwards the selection, in its order, is
        the most recently selected. At most ``n_slots`` distinct ids.
        """
        return torch.tensor(self.ensure_resident_slots(block_ids)[1], dtype=torch.long, device=self.device)

    def ensure_resident_slots(self, block_ids: "torch.Tensor | Sequence[int]") -> tuple[list[int], list[int]]:
        """:meth:`ensure_resident` for a caller that indexes with host integers: the ids and
        their slots as host lists (no tensor made). When every block is a hit, no eviction
        order is computed (and ``lru-s`` reads no score)."""
        self._check_open()
        ids = self._ids(block_ids, "ensure_resident")
        unique = list(dict.fromkeys(ids)) if len(ids) > 1 else ids
        if len(unique) > self.n_slots:
            raise InfLLMLiteError(f"ensure_resident: {len(unique)} distinct blocks selected but the "
                                  f"fast tier has {self.n_slots} slots (max_cached_blocks)")
        slot_of = self._slot_of
        missing = [b for b in unique if slot_of[b] < 0]
        victims: list[int] = []
        if missing:
            free = [s for s in range(self.n_slots) if self._block_of[s] < 0]
            if len(missing) > len(free):
                victims = self._eviction_order(exclude=set(unique))[:len(missing) - len(free)]
            for s in victims:
                slot_of[self._block_of[s]] = -1
                self._block_of[s] = -1
            targets = (free + victims)[:len(missing)]
            for b, s in zip(missing, targets):
                slot_of[b], self._block_of[s] = s, b
            self._load(missing, targets)
            if self.policy == "lru-s":
                self.slot_score.index_fill_(0, torch.tensor(targets, device=self.device), 0.0)
        tick, clock = self._tick, self._clock
        for b in unique:
            clock += 1
            tick[slot_of[b]] = clock
        self._clock = clock
        st = self._stats
        st.chunks += 1
        st.hits += len(unique) - len(missing)
        st.misses += len(missing)
        st.evictions += len(victims)
        st.bytes_slow_to_fast += 2 * self.block_nbytes * len(missing)
        return ids, [slot_of[b] for b in ids]

    def record_chunk(self, block_ids: "torch.Tensor | Sequence[int]",
                     mass: "torch.Tensor | Sequence[float]") -> None:
        """End of a chunk (``lru-s``): every resident value *= score_decay, then each selected
        (resident) block gains its attention ``mass`` (len(block_ids),). No-op for ``lru``."""
        self._check_open()
        ids = self._ids(block_ids, "record_chunk")
        mass = (mass if isinstance(mass, torch.Tensor) else torch.tensor(mass, dtype=torch.float32)).reshape(-1)
        if mass.numel() != len(ids):
            raise InfLLMLiteError(f"record_chunk: {len(ids)} blocks but {mass.numel()} masses")
        absent = [b for b in ids if self._slot_of[b] < 0]
        if absent:
            raise InfLLMLiteError(f"record_chunk: blocks {absent[:8]} are not resident; "
                                  "call ensure_resident with the chunk's selection first")
        if self.policy != "lru-s":
            return
        slots = torch.tensor([self._slot_of[b] for b in ids], dtype=torch.long, device=self.device)
        self.slot_score.mul_(self.score_decay)
        self.slot_score.index_add_(0, slots, mass.to(device=self.device, dtype=torch.float32))

    def slots_of(self, block_ids: "torch.Tensor | Sequence[int]") -> torch.Tensor:
        """Slot of each block (len,) int64 on ``device``, -1 where not resident."""
        ids = self._ids(block_ids, "slots_of")
        return torch.tensor([self._slot_of[b] for b in ids], dtype=torch.long, device=self.device)

    def resident(self) -> dict[int, int]:
        """Resident blocks: logical id -> slot."""
        return {b: s for s, b in enumerate(self._block_of) if b >= 0}

    def eviction_order(self) -> list[int]:
        """Resident blocks, the next to be evicted first."""
        return [self._block_of[s] for s in self._eviction_order(exclude=set())]

    # ------------------------------------------------------------------ reading

    def read(self, block_ids: "torch.Tensor | Sequence[int]") -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the blocks, each (B, Hkv, n, block_size, d) on ``device``, taken from the
        fast tier where resident, else from host or disk. Changes no cache state."""
        self._check_open()
        ids = self._ids(block_ids, "read")
        B, Hkv, bs, d = self.block_shape
        out_k = torch.empty(B, Hkv, len(ids), bs, d, dtype=self.dtype, device=self.device)
        out_v = torch.empty_like(out_k)
        fast = [i for i, b in enumerate(ids) if self._slot_of[b] >= 0]
        slow = [i for i, b in enumerate(ids) if self._slot_of[b] < 0]
        if fast:
            pos = torch.tensor(fast, device=self.device)
            slots = torch.tensor([self._slot_of[ids[i]] for i in fast], device=self.device)
            out_k.index_copy_(2, pos, self.slot_k.index_select(2, slots).to(self.dtype))
            out_v.index_copy_(2, pos, self.slot_v.index_select(2, slots).to(self.dtype))
        if slow:
            k, v = self._gather_slow([ids[i] for i in slow])  # (m, B, Hkv, bs, d) host
            pos = torch.tensor(slow, device=self.device)
            out_k.index_copy_(2, pos, k.to(self.device).permute(1, 2, 0, 3, 4))
            out_v.index_copy_(2, pos, v.to(self.device).permute(1, 2, 0, 3, 4))
        return out_k, out_v

    # ------------------------------------------------------------------ snapshots

    def export(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The pool's state for a snapshot: every block's K and V (n, B, Hkv, bs, d) on the
        host, from host and disk (read whole: a snapshot holds all blocks), the ``lru-s``
        values, and as JSON the page table, recency clock and counters. The fast tier holds
        copies of some of these blocks: it is not written, :meth:`restore` reloads it."""
        self._check_open()
        stats = replace(self._stats)  # reading the disk for a snapshot is not the run's traffic
        k, v = self._gather_slow(list(range(self.n_blocks)))
        self._stats = stats
        tensors = {"k": k, "v": v, "slot_score": self.slot_score.cpu()}
        meta = {"block_of": list(self._block_of), "tick": list(self._tick), "clock": self._clock,
                "stats": {f.name: getattr(stats, f.name) for f in fields(stats)}}
        return tensors, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Load :meth:`export`'s output into this new, empty pool of the same shape: the blocks
        go to host and disk by this pool's ``max_host_bytes``, and the page table's resident
        blocks are loaded back into their fast-tier slots (the same bits)."""
        self._check_open()
        if self.n_blocks:
            raise InfLLMLiteError("restore: the pool already holds blocks; restore into a new pool")
        k, v = tensors["k"], tensors["v"]  # (n, B, Hkv, bs, d)
        if k.dim() != 5 or tuple(k.shape[1:]) != self.block_shape or k.shape != v.shape:
            raise InfLLMLiteError(f"restore: blocks of shape {tuple(k.shape)} do not fit this pool "
                                  f"(n, {', '.join(map(str, self.block_shape))})")
        if len(meta["block_of"]) != self.n_slots:
            raise InfLLMLiteError(f"restore: {len(meta['block_of'])} fast-tier slots saved, this pool "
                                  f"has {self.n_slots}")
        if k.shape[0]:
            self.append(k.to(self.dtype).permute(1, 2, 0, 3, 4), v.to(self.dtype).permute(1, 2, 0, 3, 4))
        if any(b >= self.n_blocks for b in meta["block_of"]):
            raise InfLLMLiteError("restore: the page table names blocks the snapshot lacks")
        self._block_of = [int(b) for b in meta["block_of"]]
        for slot, block in enumerate(self._block_of):
            if block >= 0:
                self._slot_of[block] = slot
        resident = [(b, slot) for slot, b in enumerate(self._block_of) if b >= 0]
        if resident:
            self._load([b for b, _ in resident], [slot for _, slot in resident])
        self._tick = [int(t) for t in meta["tick"]]
        self._clock = int(meta["clock"])
        self.slot_score.copy_(tensors["slot_score"])
        self._stats = PoolStats(**meta["stats"])  # the reload above is not the run's traffic

    # ------------------------------------------------------------------ bookkeeping

    def stats(self) -> PoolStats:
        """A copy of the counters, with the current blocks per tier."""
        return replace(self._stats, blocks=self.n_blocks,
                       blocks_fast=sum(b >= 0 for b in self._block_of),
                       blocks_host=self.n_blocks - self.n_disk, blocks_disk=self.n_disk)

    @property
    def host_bytes(self) -> int:
        """Bytes allocated for the host ring (K and V)."""
        return 2 * self._host_k.shape[0] * self.block_nbytes

    @property
    def disk_bytes(self) -> int:
        """Size of the offload file (0 before the first spill)."""
        return 0 if self._disk is None else self._disk.nbytes

    @property
    def offload_path(self) -> str | None:
        """The offload file, once blocks went to disk."""
        return None if self._disk is None else self._disk.path

    def close(self) -> None:
        """Release the offload file (and its temporary directory). Idempotent."""
        if self._disk is not None:
            self._disk.close()
        self._closed = True

    def __enter__(self) -> "BlockPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _ids(self, block_ids, where: str) -> list[int]:
        """Validated logical ids as a host list (a device tensor costs one sync)."""
        if isinstance(block_ids, torch.Tensor):
            if block_ids.dim() != 1 or block_ids.dtype.is_floating_point or block_ids.dtype.is_complex \
                    or block_ids.dtype == torch.bool:
                raise InfLLMLiteError(f"{where}: block ids must be a 1-D integer tensor, "
                                      f"got {block_ids.dtype} {tuple(block_ids.shape)}")
            ids = block_ids.tolist()
        else:
            try:
                ids = [operator.index(b) for b in block_ids]
            except TypeError as err:
                raise InfLLMLiteError(f"{where}: block ids must be integers ({err})") from None
        bad = [b for b in ids if not 0 <= b < self.n_blocks]
        if bad:
            held = f"blocks 0..{self.n_blocks - 1}" if self.n_blocks else "no blocks yet"
            raise InfLLMLiteError(f"{where}: unknown block ids {bad[:8]}; the pool holds {held}")
        return ids

    def _eviction_order(self, exclude: set[int]) -> list[int]:
        """Slots of resident blocks outside ``exclude``, the first to evict first."""
        cands = [s for s, b in enumerate(self._block_of) if b >= 0 and b not in exclude]
        if self.policy == "lru-s" and cands:
            score = self.slot_score.tolist()  # host read: only when choosing
            return sorted(cands, key=lambda s: (score[s], self._tick[s]))
        return sorted(cands, key=lambda s: self._tick[s])

    def _load(self, blocks: list[int], slots: list[int]) -> None:
        """Copy blocks from host/disk into the given slots."""
        k, v = self._gather_slow(blocks)  # (m, B, Hkv, bs, d), pinned on CUDA
        if self.device.type == "cuda":
            compute = torch.cuda.current_stream(self.device)
            self._side_stream.wait_stream(compute)  # queued attention may still read these slots
            with torch.cuda.stream(self._side_stream):
                index = torch.tensor(slots, device=self.device)
                for slot, x in ((self.slot_k, k), (self.slot_v, v)):
                    x = x.to(self.device, non_blocking=True).to(slot.dtype)
                    slot.index_copy_(2, index, x.permute(1, 2, 0, 3, 4))
                done = torch.cuda.Event()
                done.record(self._side_stream)
            compute.wait_event(done)
        else:
            index = torch.tensor(slots)
            self.slot_k.index_copy_(2, index, k.permute(1, 2, 0, 3, 4).to(self.slot_k.dtype))
            self.slot_v.index_copy_(2, index, v.permute(1, 2, 0, 3, 4).to(self.slot_v.dtype))

    def _gather_slow(self, blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of blocks from the host ring or the disk, (m, B, Hkv, bs, d) each, on the
        host (pinned on CUDA)."""
        m = len(blocks)
        k = torch.empty(m, *self.block_shape, dtype=self.dtype, pin_memory=self._pin)
        v = torch.empty(m, *self.block_shape, dtype=self.dtype, pin_memory=self._pin)
        host = [i for i, b in enumerate(blocks) if b >= self.n_disk]
        disk = [i for i, b in enumerate(blocks) if b < self.n_disk]
        if host:
            pos = torch.tensor(host)
            rows = self._rows(blocks[i] for i in host)
            k.index_copy_(0, pos, self._host_k.index_select(0, rows))
            v.index_copy_(0, pos, self._host_v.index_select(0, rows))
        if disk:
            raw = torch.empty(len(disk), 2 * self.block_nbytes, dtype=torch.uint8, pin_memory=self._pin)
            self._disk.read([blocks[i] for i in disk], raw)  # (md, K bytes ‖ V bytes)
            pos = torch.tensor(disk)
            k.index_copy_(0, pos, self._from_bytes(raw[:, :self.block_nbytes]))
            v.index_copy_(0, pos, self._from_bytes(raw[:, self.block_nbytes:]))
            self._stats.bytes_disk_to_host += raw.numel()
        return k, v

    def _from_bytes(self, raw: torch.Tensor) -> torch.Tensor:
        """(m, block_nbytes) uint8 -> (m, B, Hkv, bs, d) of the pool's dtype, same bits."""
        return raw.view(self.dtype).reshape(raw.shape[0], *self.block_shape)

    def _write_disk(self, first: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Blocks ``first ..`` to disk, k/v (m, B, Hkv, bs, d) on the host."""
        if self._disk is None:
            self._disk = DiskStore(2 * self.block_nbytes, self.offload_dir)
        m = k.shape[0]
        raw = torch.cat([k.contiguous().view(torch.uint8).reshape(m, -1),
                         v.contiguous().view(torch.uint8).reshape(m, -1)], dim=1)  # (m, K ‖ V bytes)
        self._disk.write(first, raw)
        self._stats.bytes_host_to_disk += raw.numel()

    def _grow_host(self, needed: int, live: range) -> None:
        """Host ring capacity >= ``needed`` (doubling, at most ``host_limit``); the ``live``
        blocks keep their data in their new rows."""
        cap = self._host_k.shape[0]
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap, MIN_HOST_BLOCKS)
        if self.host_limit is not None:
            new_cap = min(new_cap, self.host_limit)
        new_k, new_v = self._host_empty(new_cap), self._host_empty(new_cap)
        if len(live):
            old_rows = self._rows(live)
            new_rows = torch.tensor([b % new_cap for b in live])
            new_k.index_copy_(0, new_rows, self._host_k.index_select(0, old_rows))
            new_v.index_copy_(0, new_rows, self._host_v.index_select(0, old_rows))
        self._host_k, self._host_v = new_k, new_v

    def _host_empty(self, capacity: int) -> torch.Tensor:
        """(capacity, B, Hkv, bs, d) on the host, pinned when the fast tier is a GPU."""
        return torch.empty(capacity, *self.block_shape, dtype=self.dtype,
                           pin_memory=self._pin and capacity > 0)

    def _rows(self, blocks: Iterable[int]) -> torch.Tensor:
        """Host ring rows of blocks."""
        cap = self._host_k.shape[0]
        return torch.tensor([b % cap for b in blocks], dtype=torch.long)

    def _check_open(self) -> None:
        if self._closed:
            raise InfLLMLiteError("the block pool is closed")
