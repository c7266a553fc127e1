"""The paged block pool (SPEC §7): a hypothesis state machine drives appends, selections,
reads and lru-s masses against a plain model of the tiers and of the cache policy; a few
unit tests pin errors, disk round trips and clean-up."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from infllm_lite.errors import InfLLMLiteError
from infllm_lite.memory import BlockPool
from infllm_lite.memory_config import MemoryConfig



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is faster. Restored after the module, so that no other
    module's numbers depend on whether this one was collected (a module-level
    ``set_num_threads(1)`` made test_snapshot's new process, with 2 threads, differ)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_blocks(seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN payloads, -0.0 included)."""
    int_type = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.dtype.itemsize]
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(int_type), b.view(int_type))


class PoolMachine(RuleBasedStateMachine):
    """The pool against a model: per-block truth, resident set, recency ticks, lru-s values."""

    POLICY: str | None = None  # None: drawn

    @initialize(B=st.integers(1, 2), Hkv=st.integers(1, 3), bs=st.integers(2, 8), d=st.integers(2, 8),
                n_slots=st.integers(1, 6), policy=st.sampled_from(["lru", "lru-s"]),
                decay=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
                dtype=st.sampled_from([torch.float32, torch.bfloat16]),
                host_blocks=st.one_of(st.none(), st.integers(0, 4)), extra=st.integers(0, 100))
    def setup(self, B, Hkv, bs, d, n_slots, policy, decay, dtype, host_blocks, extra):
        self.policy = self.POLICY or policy
        self.block_nbytes = B * Hkv * bs * d * dtype.itemsize
        if host_blocks is None:
            max_host = None
        else:  # room for host_blocks blocks and a bit, never a whole one more
            max_host = max(1, host_blocks * 2 * self.block_nbytes + extra % (2 * self.block_nbytes))
        self.host_limit = host_blocks
        self.max_host = max_host
        self.shape, self.dtype, self.n_slots, self.decay = (B, Hkv, bs, d), dtype, n_slots, decay
        self.pool = BlockPool(B, Hkv, bs, d, n_slots=n_slots, dtype=dtype, device="cpu",
                              policy=self.policy, score_decay=decay, max_host_bytes=max_host)
        self.truth: list[tuple[torch.Tensor, torch.Tensor]] = []  # per block, (B, Hkv, bs, d)
        self.resident: set[int] = set()
        self.tick: dict[int, int] = {}
        self.value: dict[int, np.float32] = {}
        self.clock = 0
        self.last_selection: list[int] | None = None
        self.hits = self.misses = self.evictions = self.chunks = 0
        self.disk_reads = 0  # blocks read from disk

    def teardown(self):
        pool = getattr(self, "pool", None)
        if pool is not None:
            path = pool.offload_path
            pool.close()
            assert path is None or not os.path.exists(path)

    # ---------------------------------------------------------------- model helpers

    def n_disk(self) -> int:
        n = len(self.truth)
        return 0 if self.host_limit is None else max(0, n - self.host_limit)

    def model_eviction_order(self, exclude=frozenset()) -> list[int]:
        cands = [b for b in self.resident if b not in exclude]
        if self.policy == "lru-s":
            return sorted(cands, key=lambda b: (self.value[b], self.tick[b]))
        return sorted(cands, key=lambda b: self.tick[b])

    # ---------------------------------------------------------------- rules

    @rule(n=st.integers(0, 3), seed=st.integers(0, 2**31 - 1))
    def append(self, n, seed):
        B, Hkv, bs, d = self.shape
        k = random_blocks(seed, (B, Hkv, n, bs, d), self.dtype)
        v = random_blocks(seed + 1, (B, Hkv, n, bs, d), self.dtype)
        first = len(self.truth)
        ids = self.pool.append(k, v)
        assert list(ids) == list(range(first, first + n))
        self.truth.extend((k[:, :, j].clone(), v[:, :, j].clone()) for j in range(n))

    @precondition(lambda self: len(self.truth) > 0)
    @rule(data=st.data())
    def select(self, data):
        n = len(self.truth)
        sel = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=min(self.n_slots, n),
                                 unique=True), label="selection")
        if data.draw(st.booleans(), label="repeat one id"):
            sel = sel + [sel[0]]
        as_tensor = data.draw(st.booleans(), label="as tensor")
        n_disk = self.n_disk()
        unique = list(dict.fromkeys(sel))
        missing = [b for b in unique if b not in self.resident]
        n_evict = max(0, len(missing) - (self.n_slots - len(self.resident)))
        victims = self.model_eviction_order(exclude=set(unique))[:n_evict]

        slots = self.pool.ensure_resident(torch.tensor(sel) if as_tensor else sel)

        assert slots.dtype == torch.long and slots.shape == (len(sel),)
        for b, s in zip(sel, slots.tolist()):
            assert 0 <= s < self.n_slots
            assert same_bits(self.pool.slot_k[:, :, s], self.truth[b][0])
            assert same_bits(self.pool.slot_v[:, :, s], self.truth[b][1])
        assert len(set(slots.tolist())) == len(unique)
        # model update
        self.resident -= set(victims)
        self.resident |= set(unique)
        for b in missing:
            self.value[b] = np.float32(0)
        for b in victims:
            del self.tick[b], self.value[b]
        for b in unique:
            self.clock += 1
            self.tick[b] = self.clock
        self.chunks += 1
        self.hits += len(unique) - len(missing)
        self.misses += len(missing)
        self.evictions += len(victims)
        self.disk_reads += sum(b < n_disk for b in missing)
        self.last_selection = unique

    @precondition(lambda self: self.last_selection is not None)
    @rule(data=st.data())
    def record(self, data):
        sel = self.last_selection
        mass = data.draw(st.lists(st.sampled_from([0.0, 0.25, 1.0, 3.0, 7.5]), min_size=len(sel),
                                  max_size=len(sel)), label="mass")
        self.pool.record_chunk(sel, torch.tensor(mass) if data.draw(st.booleans()) else mass)
        if self.policy == "lru-s":
            decay = np.float32(self.decay)
            for b in self.resident:
                self.value[b] = np.float32(self.value[b] * decay)
            for b, m in zip(sel, mass):
                self.value[b] = np.float32(self.value[b] + np.float32(m))

    @precondition(lambda self: len(self.truth) > 0)
    @rule(data=st.data())
    def read(self, data):
        n = len(self.truth)
        ids = data.draw(st.lists(st.integers(0, n - 1), max_size=6), label="read ids")
        k, v = self.pool.read(ids)
        B, Hkv, bs, d = self.shape
        assert k.shape == v.shape == (B, Hkv, len(ids), bs, d)
        for j, b in enumerate(ids):
            assert same_bits(k[:, :, j], self.truth[b][0]), f"K of block {b} changed"
            assert same_bits(v[:, :, j], self.truth[b][1]), f"V of block {b} changed"
        n_disk = self.n_disk()
        self.disk_reads += sum(b < n_disk and b not in self.resident for b in ids)

    # ---------------------------------------------------------------- invariants

    @invariant()
    def fast_tier_matches_model(self):
        if not hasattr(self, "pool"):
            return
        resident = self.pool.resident()
        assert len(resident) <= self.n_slots
        assert set(resident) == self.resident
        assert len(set(resident.values())) == len(resident)
        for b, s in resident.items():
            assert same_bits(self.pool.slot_k[:, :, s], self.truth[b][0])
            assert same_bits(self.pool.slot_v[:, :, s], self.truth[b][1])
        assert self.pool.eviction_order() == self.model_eviction_order()
        if self.truth:
            slots = self.pool.slots_of(list(range(len(self.truth)))).tolist()
            assert [s >= 0 for s in slots] == [b in self.resident for b in range(len(self.truth))]
            assert all(resident[b] == s for b, s in enumerate(slots) if s >= 0)

    @invariant()
    def stats_are_consistent(self):
        if not hasattr(self, "pool"):
            return
        s = self.pool.stats()
        n, n_disk, pair = len(self.truth), self.n_disk(), 2 * self.block_nbytes
        assert (s.blocks, s.blocks_disk, s.blocks_host, s.blocks_fast) == \
            (n, n_disk, n - n_disk, len(self.resident))
        assert s.blocks_host + s.blocks_disk == s.blocks
        assert (s.hits, s.misses, s.evictions, s.chunks) == \
            (self.hits, self.misses, self.evictions, self.chunks)
        assert s.bytes_slow_to_fast == pair * self.misses
        assert s.bytes_host_to_disk == pair * n_disk  # every block written to disk once
        assert s.bytes_disk_to_host == pair * self.disk_reads
        if self.max_host is not None:
            assert self.pool.host_bytes <= self.max_host
        assert (self.pool.offload_path is not None) == (n_disk > 0)
        assert self.pool.disk_bytes >= pair * n_disk


class LruMachine(PoolMachine):
    POLICY = "lru"


class LruSMachine(PoolMachine):
    POLICY = "lru-s"


MACHINE_SETTINGS = settings(max_examples=50, stateful_step_count=30, deadline=None)
TestLruPool = LruMachine.TestCase
TestLruPool.settings = MACHINE_SETTINGS
TestLruSPool = LruSMachine.TestCase
TestLruSPool.settings = MACHINE_SETTINGS


# -------------------------------------------------------------------- unit tests

def small_pool(**kwargs) -> BlockPool:
    return BlockPool(1, 2, 4, 3, **{"n_slots": 2, "device": "cpu", **kwargs})


def blocks(n: int, seed: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return random_blocks(seed, (1, 2, n, 4, 3), dtype), random_blocks(seed + 1, (1, 2, n, 4, 3), dtype)


def test_lru_evicts_the_least_recently_selected():
    with small_pool(policy="lru") as pool:
        pool.append(*blocks(4))
        for sel in ([0], [1], [0]):
            pool.ensure_resident(sel)
        assert pool.eviction_order() == [1, 0]
        pool.ensure_resident([2])
        assert set(pool.resident()) == {0, 2}
        pool.ensure_resident([3, 0])  # 0 is selected again: 2 goes though more recent than 0 was
        assert set(pool.resident()) == {0, 3}
        s = pool.stats()
        assert (s.hits, s.misses, s.evictions, s.chunks) == (2, 4, 2, 5)


def test_lru_s_evicts_the_lowest_decayed_mass():
    with small_pool(policy="lru-s", score_decay=0.5) as pool:
        pool.append(*blocks(3))
        pool.ensure_resident([0, 1])
        pool.record_chunk([0, 1], [4.0, 1.0])  # values 4, 1
        pool.ensure_resident([1])  # a hit keeps its value
        pool.record_chunk([1], [2.0])  # values 2, 2.5
        assert pool.slot_score[pool.slots_of([0, 1])].tolist() == [2.0, 2.5]
        pool.ensure_resident([2])  # evicts 0 (2.0 < 2.5) although 1 was selected earlier
        assert set(pool.resident()) == {1, 2}
        assert pool.eviction_order() == [2, 1]  # the newcomer enters at 0


def test_errors_are_clear():
    pool = small_pool()
    with pytest.raises(InfLLMLiteError, match="holds no blocks yet"):
        pool.ensure_resident([0])
    pool.append(*blocks(3))
    with pytest.raises(InfLLMLiteError, match="3 distinct blocks selected but the fast tier has 2 slots"):
        pool.ensure_resident([0, 1, 2])
    pool.ensure_resident([0, 0, 1])  # duplicates count once
    with pytest.raises(InfLLMLiteError, match=r"unknown block ids \[3, -1\]; the pool holds blocks 0..2"):
        pool.ensure_resident([3, -1])
    with pytest.raises(InfLLMLiteError, match="unknown block ids"):
        pool.read([7])
    with pytest.raises(InfLLMLiteError, match="1-D integer tensor"):
        pool.ensure_resident(torch.tensor([0.0]))
    with pytest.raises(InfLLMLiteError, match="block ids must be integers"):
        pool.read([0.5])
    k, v = blocks(2)
    with pytest.raises(InfLLMLiteError, match=r"must be \(B, Hkv, n_new, block_size, d\) = \(1, 2, n_new, 4, 3\)"):
        pool.append(k[:, :, :, :2], v[:, :, :, :2])
    with pytest.raises(InfLLMLiteError, match="dtype torch.bfloat16, the pool stores torch.float32"):
        pool.append(k.bfloat16(), v.bfloat16())
    with pytest.raises(InfLLMLiteError, match="differ in shape"):
        pool.append(k, v[:, :, :1])
    with pytest.raises(InfLLMLiteError, match="not resident"):
        pool.record_chunk([2], [1.0])
    with pytest.raises(InfLLMLiteError, match="2 blocks but 1 masses"):
        pool.record_chunk([0, 1], [1.0])
    assert pool.stats().blocks == 3  # failed calls changed nothing
    pool.close()
    with pytest.raises(InfLLMLiteError, match="closed"):
        pool.read([0])
    with pytest.raises(InfLLMLiteError, match="n_slots must be a positive integer"):
        small_pool(n_slots=0)
    with pytest.raises(InfLLMLiteError, match="policy must be one of lru, lru-s"):
        small_pool(policy="fifo")
    with pytest.raises(InfLLMLiteError, match="is not a directory"):
        small_pool(offload_dir="/nonexistent/infllm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disk_round_trip_is_bit_identical(dtype):
    k, v = blocks(5, seed=3, dtype=dtype)
    special = torch.tensor([float("inf"), -float("inf"), -0.0, float("nan"), 1e-40, -3.5e38, 1.0]).to(dtype)
    k.view(-1)[:special.numel()] = special
    nan_payload = {torch.float32: (torch.int32, 0x7FC01234), torch.bfloat16: (torch.int16, 0x7FC5)}[dtype]
    v.view(nan_payload[0]).view(-1)[0] = nan_payload[1]
    with small_pool(dtype=dtype, max_host_bytes=1) as pool:  # no host room: all on disk
        pool.append(k[:, :, :2], v[:, :, :2])
        pool.append(k[:, :, 2:], v[:, :, 2:])
        s = pool.stats()
        assert (s.blocks_disk, s.blocks_host, pool.host_bytes) == (5, 0, 0)
        got_k, got_v = pool.read([4, 0, 2, 1, 3])
        order = [4, 0, 2, 1, 3]
        assert same_bits(got_k, k[:, :, order].contiguous()) and same_bits(got_v, v[:, :, order].contiguous())
        slots = pool.ensure_resident([3, 0])
        assert same_bits(pool.slot_k[:, :, slots], k[:, :, [3, 0]].contiguous())
        assert same_bits(pool.slot_v[:, :, slots], v[:, :, [3, 0]].contiguous())
        assert pool.stats().bytes_disk_to_host == 2 * pool.block_nbytes * (5 + 2)


def test_host_budget_spills_the_oldest_blocks():
    with small_pool(max_host_bytes=3 * 2 * 96 + 50) as pool:  # 3 blocks of K+V (96 B each)
        k, v = blocks(7)
        for j in range(7):
            pool.append(k[:, :, j:j + 1], v[:, :, j:j + 1])
            assert pool.host_bytes <= pool.max_host_bytes
        s = pool.stats()
        assert (s.blocks_host, s.blocks_disk, s.bytes_host_to_disk) == (3, 4, 4 * 2 * 96)
        got_k, got_v = pool.read(range(7))
        assert torch.equal(got_k, k) and torch.equal(got_v, v)


def test_temporary_offload_dir_is_removed_on_close_and_on_collection():
    pool = small_pool(max_host_bytes=1)
    pool.append(*blocks(2))
    folder = os.path.dirname(pool.offload_path)
    assert os.path.isdir(folder) and os.path.getsize(pool.offload_path) > 0
    pool.close()
    assert not os.path.exists(folder)
    pool.close()  # idempotent

    pool = small_pool(max_host_bytes=1)
    pool.append(*blocks(1))
    folder = os.path.dirname(pool.offload_path)
    del pool
    gc.collect()
    assert not os.path.exists(folder)


def test_given_offload_dir_keeps_the_folder(tmp_path):
    with small_pool(max_host_bytes=1, offload_dir=str(tmp_path)) as pool:
        pool.append(*blocks(2))
        assert os.path.dirname(pool.offload_path) == str(tmp_path)
        assert len(os.listdir(tmp_path)) == 1
    assert tmp_path.is_dir() and os.listdir(tmp_path) == []


def test_from_config_shares_the_host_budget_over_layers(tmp_path):
    config = MemoryConfig(n_init=4, n_local=16, block_size=4, topk=2, exc_block_size=8,
                          max_cached_blocks=3, cache_policy="lru-s", score_decay=0.5,
                          max_host_bytes=10 * 2 * 96, offload_dir=tmp_path)
    assert config.offload_dir == str(tmp_path) and config.to_dict()["max_host_bytes"] == 1920
    with BlockPool.from_config(config, batch=1, n_kv_heads=2, head_dim=3, device="cpu", n_layers=5) as pool:
        assert (pool.n_slots, pool.policy, pool.score_decay, pool.host_limit) == (3, "lru-s", 0.5, 2)
        assert pool.block_shape == (1, 2, 4, 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_host_bytes=0), "max_host_bytes must be a positive integer or None, got 0"),
    (dict(max_host_bytes=-5), "max_host_bytes must be a positive integer or None"),
    (dict(max_host_bytes=1.5), "max_host_bytes must be a positive integer or None"),
    (dict(max_host_bytes=True), "max_host_bytes must be a positive integer or None"),
    (dict(offload_dir=""), "offload_dir must be a directory path or None"),
    (dict(offload_dir=3), "offload_dir must be a directory path or None"),
])
def test_memory_config_checks_the_new_fields(kwargs, message):
    with pytest.raises(InfLLMLiteError, match=message):
        MemoryConfig(**kwargs)
    assert MemoryConfig().max_host_bytes is None and MemoryConfig().offload_dir is None


def test_external_fast_tier_is_written_in_place_in_its_own_dtype():
    """The InfLLM layer hands the pool views into its float32 slot array (fast_k/fast_v):
    loads land there, converted; reads come back in the pool's dtype, bit for bit."""
    d, bs = 4, 3
    slots = torch.zeros(1, 2, 5 * bs + 1, d + 2)  # (B, Hkv, S, d + 2) like the attention's
    fast_k = slots[:, :, :5 * bs, :d].unflatten(2, (5, bs))
    fast_v = slots.clone()[:, :, :5 * bs, :d].unflatten(2, (5, bs))
    pool = BlockPool(1, 2, bs, d, n_slots=5, dtype=torch.bfloat16, fast_k=fast_k, fast_v=fast_v,
                     max_host_bytes=2 * 2 * bs * d * 2 * 2)  # two blocks in host, the rest on disk
    k = torch.randn(1, 2, 6, bs, d).to(torch.bfloat16)
    v = torch.randn(1, 2, 6, bs, d).to(torch.bfloat16)
    pool.append(k, v)
    got = pool.ensure_resident([5, 0, 3])
    for block, slot in zip([5, 0, 3], got.tolist()):
        a = slot * bs
        assert torch.equal(slots[:, :, a:a + bs, :d], k[:, :, block].float())  # in place, float32
    rk, rv = pool.read([0, 3, 5, 1])
    assert rk.dtype == torch.bfloat16 and torch.equal(rk, k[:, :, [0, 3, 5, 1]]) and torch.equal(rv, v[:, :, [0, 3, 5, 1]])
    assert slots[:, :, :, d].sum() == 0  # the indicator columns are untouched
    pool.close()
    with pytest.raises(InfLLMLiteError, match="give both fast_k and fast_v"):
        BlockPool(1, 2, bs, d, n_slots=5, fast_k=fast_k)
    with pytest.raises(InfLLMLiteError, match="fast_k must be a floating"):
        BlockPool(1, 2, bs, d, n_slots=4, fast_k=fast_k, fast_v=fast_v)


def test_stats_add_up_and_subtract():
    from infllm_lite.memory import PoolStats
    a = PoolStats(hits=3, misses=1, blocks=10, blocks_host=10, bytes_slow_to_fast=100)
    b = PoolStats(hits=1, misses=1, blocks=4, blocks_host=4, bytes_slow_to_fast=50)
    total = a + b
    assert (total.hits, total.misses, total.blocks, total.bytes_slow_to_fast) == (4, 2, 14, 150)
    assert total.hit_rate == pytest.approx(4 / 6) and PoolStats().hit_rate == 0.0
    later = a - b  # between two snapshots: counters subtract, block counts are the later ones
    assert (later.hits, later.misses, later.bytes_slow_to_fast, later.blocks) == (2, 0, 50, 10)
