"""InfLLM at tile scale (issue 16): production sizes, and the tile lists held to SPEC §4.

The property tests of test_infllm_layer.py use windows and chunks of at most 64 tokens, so
no kernel there ever sees a full 128-query FlexAttention tile, more than one query tile, or
a 64-query window tile next to another. Here:

1. **Layer vs the dense reference at production sizes**: n_local 256..640, exc_block_size
   128..512, block_size 64..128, n_init 0..128, topk 1..4, sequences long enough that more
   than topk blocks have formed before the last chunks (retrieval really chooses, far
   attention spans several blocks beyond the window), awkward call splits (prefill cut at
   odd places, single-token decode steps). The uncompiled kernels ``window-eager``,
   ``flex-eager`` and ``torch`` are held to ``tests/infllm_reference.py`` with
   test_infllm_layer's checks (same tolerance, same near-tie handling).
2. **The tile lists against a dense mask built from SPEC §4** (the attention-gym habit:
   ``BlockMask.to_dense()`` equals the dense rule at tile level), so that a tile list that
   visits an *extra* tile fails here instead of only slowing the run: ``chunk_masks``'s
   local and swapped lists, ``far_tiles``'s per-sequence far lists, the window kernel's
   windows and far prefixes (``window_sizes``, ``window_slots``) and ``block_keys``.

The slot positions are built here from the slot layout (infllm.py's module docstring),
not by ``InfLLMState.geometry``: initial tokens, the tail (pending remainder, window,
chunk) from ``tail_start`` on, unused tail slots and pool slots ``EMPTY``, the sentinel
last; the chunk's query rows padded with ``PAD_QUERY``.

Exact sets, derived from SPEC §4 and the kernels' contracts:

* local call (query tile × slot tile): listed (partial ∪ full) iff some (query, slot) pair
  in it has ``0 <= i - j < n_local``, or the tile holds the sentinel (always listed, as a
  partial tile: mask_mod decides there); full iff the tile is whole (128 × 128 inside the
  arrays) and every pair in it is visible, the sentinel's tile never.
* swapped call (slots ``[0, local_end)`` × the queries stacked G times + a sentinel): the
  same rule with the roles swapped, ``0 <= i - j < n_local``.
* far call, per sequence: ``i - j >= n_local`` for the slots before the pool (initial
  tokens and pending remainder: a tail slot that is not local is pending, SPEC §3), every
  selected pool slot (position ``FAR``) for every real query, the sentinel always.
* window kernel: tile t's window ``W = tile + n_local - 1`` consecutive slots holds every
  slot local to its real queries and ends at its last real query's slot (else clamped at
  slot 0), inside ``[0, local_end)``; its prefix ``[0, reach[t])`` holds every slot far to
  its real queries, ``reach[t] <= local_end``; window ∪ prefix ∪ selected blocks is each
  query's SPEC set, no slot counted twice.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import BlockMask

from infllm_lite.attention.flex_joint import chunk_masks, far_tiles
from infllm_lite.attention.slots import EMPTY, FAR, FLEX_BLOCK, PAD_QUERY
from infllm_lite.attention.window_joint import block_keys, window_sizes, window_slots
from infllm_lite.memory_config import MemoryConfig, n_formed_blocks

from infllm_reference import execution_chunks
from test_infllm_layer import check_matches_reference  # same checks, tolerance and near-ties


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one intra-op thread (see test_infllm_layer.one_thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def quiet_eager_flex():
    """Uncompiled flex warns once that it materialises its scores: that is the point here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


# --------------------------------------------------------------------------- strategies


@st.composite
def tile_configs(draw):
    """Production-sized InfLLM settings: boundaries (128-multiples, 0) and odd values."""
    n_local = draw(st.one_of(st.sampled_from([256, 512, 640]), st.integers(256, 640)))
    exc = draw(st.one_of(st.sampled_from([128, 256, 512]), st.integers(128, 512)))
    exc = min(exc, n_local)
    block_size = draw(st.one_of(st.sampled_from([64, 128]), st.integers(64, 128)))
    n_init = draw(st.one_of(st.sampled_from([0, 128]), st.integers(0, 130)))
    topk = draw(st.integers(1, 4))
    return MemoryConfig(n_init=n_init, n_local=n_local, block_size=block_size, topk=topk,
                        repr_topk=draw(st.integers(1, 4)), exc_block_size=exc,
                        max_cached_blocks=topk + draw(st.integers(0, 2)),
                        cache_policy=draw(st.sampled_from(["lru", "lru-s"])))


def retrieval_length(config: MemoryConfig, extra: int, rest: int) -> int:
    """A length at which even a last chunk of exc_block_size queries starts with more than
    topk formed blocks (so every call split ends in chunks whose retrieval chooses)."""
    return (config.n_init + config.n_local + (config.topk + 1 + extra) * config.block_size
            + config.exc_block_size + rest)


@st.composite
def awkward_calls(draw, L: int, max_decode: int):
    """Model calls summing to L: a prefill cut at odd places then single-token decode steps,
    random cuts, or one call."""
    kind = draw(st.sampled_from(["decode", "decode", "random", "one"]))
    if kind == "one":
        return [L]
    if kind == "decode":
        n_decode = draw(st.integers(1, max_decode))
        prefill = L - n_decode
        cuts = sorted(draw(st.sets(st.integers(1, prefill - 1), max_size=2)))
    else:
        cuts = sorted(draw(st.sets(st.integers(1, L - 1), min_size=1, max_size=5)))
        n_decode, prefill = 0, L
    bounds = [0, *cuts, prefill]
    return [b - a for a, b in zip(bounds, bounds[1:])] + [1] * n_decode


@st.composite
def tile_cases(draw, max_decode: int = 6, batch=(1, 2)):
    """(config, calls, B, H, Hkv, d, seed) as test_infllm_layer.check_matches_reference takes."""
    config = draw(tile_configs())
    L = retrieval_length(config, draw(st.integers(0, 1)), draw(st.integers(0, config.block_size - 1)))
    calls = draw(awkward_calls(L, max_decode))
    H, Hkv = draw(st.sampled_from([(2, 1), (3, 1)]))
    d = draw(st.sampled_from([8, 16]))
    B = draw(st.integers(*batch))
    return config, calls, B, H, Hkv, d, draw(st.integers(0, 2**31 - 1))


# --------------------------------------------------------------------------- 1. layer vs reference


def check_case(kernel: str, case) -> None:
    config, calls = case[0], case[1]
    chunks = execution_chunks(calls, config.exc_block_size)
    # what makes it tile scale: full 128-query tiles, several window tiles, far attention
    # over more blocks than are selected in the last chunks
    assert any(e - s >= FLEX_BLOCK for s, e in chunks) or config.exc_block_size < FLEX_BLOCK
    assert n_formed_blocks(config, chunks[-1][0]) > config.topk
    event(f"decode steps: {calls.count(1) > 1}")
    event(f"calls: {len(calls)}")
    check_matches_reference(kernel, case)


# Always run, besides the drawn cases: n_init 128 with blocks of 128 (every region on a
# tile boundary); n_init 37, blocks of 64, exc 200 (tail tiles off the boundaries, chunks
# ending in a part-padding window tile, two sequences, lru-s); n_init 0 with blocks of 100
# (pool blocks straddling tiles). Each a prefill cut at odd places, then decode steps.
EXAMPLES = [
    (MemoryConfig(n_init=128, n_local=512, block_size=128, topk=2, repr_topk=4, exc_block_size=512,
                  max_cached_blocks=3), [1155, 262, 1, 1, 1], 1, 2, 1, 16, 7),
    (MemoryConfig(n_init=37, n_local=300, block_size=64, topk=3, repr_topk=2, exc_block_size=200,
                  max_cached_blocks=3, cache_policy="lru-s"), [333, 501, 129, 1, 1, 1, 1], 2, 3, 1, 8, 11),
    (MemoryConfig(n_init=0, n_local=256, block_size=100, topk=1, repr_topk=3, exc_block_size=128,
                  max_cached_blocks=2), [77, 640, 1, 1], 1, 2, 1, 8, 3),
]


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=tile_cases())
@example(case=EXAMPLES[0])
@example(case=EXAMPLES[1])
@example(case=EXAMPLES[2])
def test_window_kernel_matches_reference_at_tile_scale(case):
    """The CPU's default kernel (uncompiled) with its production 64-query tiles: up to 8
    tiles a chunk, a last tile of padding rows, windows reaching into the initial tokens."""
    check_case("window-eager", case)


@settings(max_examples=2, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=tile_cases(max_decode=3, batch=(1, 1)))
@example(case=EXAMPLES[0])
@example(case=EXAMPLES[1])
def test_flex_kernel_matches_reference_at_tile_scale(case):
    """The FlexAttention calls (uncompiled: eager flex materialises every visited tile, a
    few seconds a sequence here) with whole 128 × 128 tiles, full and partial."""
    check_case("flex-eager", case)


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=tile_cases())
@example(case=EXAMPLES[1])
def test_torch_kernel_matches_reference_at_tile_scale(case):
    """The debugging path (every logit materialised from the same slot positions)."""
    check_case("torch", case)


# --------------------------------------------------------------------------- slot layout


class Layout:
    """One layer's slot array (infllm.py's module docstring): initial tokens
    ``[0, n_init)``, the tail ``[n_init, local_end)`` (capacity n_local + block + exc), the
    pool's fast-tier slots from the first tile boundary at or after ``local_end``
    (``max(max_cached_blocks, B·topk, 1)`` blocks), the sentinel last."""

    def __init__(self, config: MemoryConfig, batch: int):
        self.config, self.batch = config, batch
        self.tail_slot = config.n_init
        self.local_end = config.n_init + config.n_local + config.block_size + config.exc_block_size
        self.pool_slot = -(-self.local_end // FLEX_BLOCK) * FLEX_BLOCK
        self.n_pool = max(config.max_cached_blocks, batch * config.topk, 1)
        self.pool_end = self.pool_slot + self.n_pool * config.block_size
        self.S = self.pool_end + 1

    def tail_start(self, s: int) -> int:
        """Position of the first tail slot during the chunk starting at s: past the blocks
        formed by then (SPEC §3)."""
        return self.config.n_init + n_formed_blocks(self.config, s) * self.config.block_size

    def positions(self, s: int, e: int, padded: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q_pos (padded,) and k_pos (S,) of the chunk [s, e)."""
        n_init, T = self.config.n_init, e - s
        rows = torch.arange(padded)
        q_pos = torch.where(rows < T, s + rows, PAD_QUERY)
        k_pos = torch.full((self.S,), EMPTY, dtype=torch.long)
        k_pos[:min(n_init, e)] = torch.arange(min(n_init, e))
        ts = self.tail_start(s)
        used = max(0, e - ts)
        assert used <= self.local_end - self.tail_slot, "the tail's capacity is never exceeded"
        k_pos[self.tail_slot:self.tail_slot + used] = torch.arange(ts, ts + used)
        return q_pos, k_pos

    def last_slot(self, s: int, e: int) -> int:
        """The slot after the chunk's last token."""
        return e if e <= self.config.n_init else self.tail_slot + e - self.tail_start(s)

    def pool_marks(self, selected: list[list[int]]) -> torch.Tensor:
        """(B, n_pool·block) True on the slots of each sequence's selected pool blocks."""
        marks = torch.zeros(self.batch, self.n_pool, dtype=torch.bool)
        for r, row in enumerate(selected):
            marks[r, row] = True
        return marks.repeat_interleave(self.config.block_size, dim=1)

    def far_pos(self, k_pos: torch.Tensor, pool_far: torch.Tensor) -> torch.Tensor:
        """(B, S): k_pos with the selected pool slots at FAR."""
        out = k_pos.expand(self.batch, -1).clone()
        out[:, self.pool_slot:self.pool_end] = torch.where(pool_far, FAR, EMPTY)
        return out


def test_layout_is_the_librarys():
    """The layout built here is the one the library uses (when it exposes one)."""
    from infllm_lite.attention import slots
    library = getattr(slots, "SlotLayout", None)
    if library is None or not hasattr(library, "build"):
        pytest.skip("no SlotLayout.build in attention/slots.py")
    for config, batch in [(MemoryConfig(n_init=37, n_local=300, block_size=100, topk=3, exc_block_size=200,
                                        max_cached_blocks=4), 2),
                          (MemoryConfig(n_init=128, n_local=640, block_size=128, topk=4, exc_block_size=512,
                                        max_cached_blocks=4), 3)]:
        ours, theirs = Layout(config, batch), library.build(config, batch_size=batch, group=1)
        for name in ("tail_slot", "local_end", "pool_slot", "n_pool", "pool_end"):
            assert getattr(theirs, name) == getattr(ours, name), name
        assert theirs.n_slots == ours.S
        if hasattr(theirs, "slot_positions"):
            for s, e in [(0, 200), (100, 101), (1500, 1700), (1699, 1700)]:
                ts = ours.tail_start(s)
                assert torch.equal(theirs.slot_positions(e, ts, torch.device("cpu")), ours.positions(s, e, 1)[1])


@st.composite
def chunk_geometries(draw):
    """(layout, s, e, G, selected): a chunk at production sizes anywhere in a sequence,
    full, partial (padded) or a decode step, and each sequence's selected pool blocks."""
    config = draw(tile_configs())
    B = draw(st.integers(1, 3))
    G = draw(st.sampled_from([1, 2, 3]))
    layout = Layout(config, B)
    exc, n_init, n_local, bs = config.exc_block_size, config.n_init, config.n_local, config.block_size
    kind = draw(st.sampled_from(["full", "partial", "decode"]))
    T = {"full": exc, "decode": 1}.get(kind) or draw(st.integers(1, exc))
    far_start = n_init + n_local  # the first position with a far key
    s = draw(st.one_of(
        st.integers(0, n_init + 2),  # straddling the initial tokens
        st.integers(max(0, far_start - T - 2), far_start + 2),  # the first far keys
        st.integers(far_start, far_start + 3 * bs),  # the first blocks formed
        st.integers(far_start, far_start + 12 * bs),  # blocks formed, pending remainder
        st.integers(far_start + bs * config.topk, far_start + 12 * bs),  # retrieval chooses
        st.integers(0, far_start + 12 * bs)))
    # the pool slots of each sequence's selection: min(topk, formed) distinct blocks
    k = min(config.topk, n_formed_blocks(config, s))
    selected = [sorted(draw(st.sets(st.integers(0, layout.n_pool - 1), min_size=k, max_size=k)))
                for _ in range(B)]
    event(f"chunk: {kind}")
    event(f"far keys: {s + T - 1 >= far_start}")
    return layout, s, s + T, G, selected


def geometry_example(config: MemoryConfig, B: int, s: int, T: int, G: int, selected: list[list[int]]):
    return Layout(config, B), s, s + T, G, selected


GEOMETRY_EXAMPLES = [
    # a slot tile holding initial tokens and the tail (n_init 37) after blocks formed, pool
    # blocks of 100 slots straddling tiles, two sequences selecting differently
    geometry_example(MemoryConfig(n_init=37, n_local=300, block_size=100, topk=3, exc_block_size=200,
                                  max_cached_blocks=4), 2, 1000, 200, 3, [[0, 2, 5], [1, 3, 4]]),
    # the production defaults, a decode step
    geometry_example(MemoryConfig(n_init=128, n_local=640, block_size=128, topk=4, exc_block_size=512,
                                  max_cached_blocks=4), 1, 2000, 1, 2, [[0, 1, 2, 3]]),
    # a partial chunk straddling the initial tokens, nothing formed
    geometry_example(MemoryConfig(n_init=100, n_local=256, block_size=64, topk=1, exc_block_size=256,
                                  max_cached_blocks=1), 1, 50, 130, 1, [[]]),
]


# --------------------------------------------------------------------------- dense rules


def local_rule(q_pos: torch.Tensor, k_pos: torch.Tensor, n_local: int) -> torch.Tensor:
    """(…T, S): SPEC §4's local rule 0 <= i - j < n_local (positions of any shape)."""
    dist = q_pos[..., :, None] - k_pos[..., None, :]
    return (dist >= 0) & (dist < n_local)


def far_rule(q_pos: torch.Tensor, k_pos: torch.Tensor, n_local: int) -> torch.Tensor:
    return q_pos[..., :, None] - k_pos[..., None, :] >= n_local


def with_sentinel(visible: torch.Tensor) -> torch.Tensor:
    """The last key (the sentinel) is visible to every query."""
    visible = visible.clone()
    visible[..., -1] = True
    return visible


def tiles_of(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(…, T, S) element visibility -> per FLEX_BLOCK × FLEX_BLOCK tile (…, Qt, Kt): some
    pair visible; every pair visible (pairs past the arrays' ends count as not visible)."""
    T, S = dense.shape[-2:]
    x = F.pad(dense.to(torch.int8), (0, (-S) % FLEX_BLOCK, 0, (-T) % FLEX_BLOCK)).bool()
    x = x.unflatten(-1, (-1, FLEX_BLOCK)).unflatten(-3, (-1, FLEX_BLOCK))  # (…, Qt, 128, Kt, 128)
    return x.any(dim=-1).any(dim=-2), x.all(dim=-1).all(dim=-2)


def listed(counts: torch.Tensor, indices: torch.Tensor, n_cols: int) -> torch.Tensor:
    """BlockMask counts (Bm, 1, Qt) and indices (Bm, 1, Qt, ≥ count) -> (Bm, Qt, n_cols)
    bool; a tile listed twice in one row fails."""
    assert counts.dtype == indices.dtype == torch.int32
    Bm, _, Qt = counts.shape
    out = torch.zeros(Bm, Qt, n_cols, dtype=torch.bool)
    for b in range(Bm):
        for q in range(Qt):
            idx = indices[b, 0, q, :int(counts[b, 0, q])].tolist()
            assert len(set(idx)) == len(idx), f"row {b}, query tile {q} lists a tile twice: {idx}"
            assert all(0 <= x < n_cols for x in idx), idx
            out[b, q, idx] = True
    return out


def describe(tiles: torch.Tensor) -> list:
    return [tuple(x) for x in tiles.nonzero().tolist()]


def check_tile_lists(lists: tuple[torch.Tensor, ...], dense: torch.Tensor, T: int, S: int,
                     sentinel_tile: int, what: str) -> None:
    """The tile lists (partial counts, indices, full counts, indices) of one call against
    its dense element visibility (Bm, T, S), the sentinel column visible."""
    assert dense.shape[-2:] == (T, S)
    some, every = tiles_of(dense)
    Kt = -(-S // FLEX_BLOCK)
    partial, full = listed(*lists[:2], Kt), listed(*lists[2:], Kt)
    expected_full = every.clone()
    expected_full[..., sentinel_tile] = False  # the sentinel's tile is always partial
    assert not (partial & full).any(), f"{what}: tiles listed both partial and full: {describe(partial & full)}"
    assert partial[..., sentinel_tile].all(), f"{what}: the sentinel's tile must be listed (partial) for every query tile"
    extra, missing = (partial | full) & ~some, some & ~(partial | full)
    assert not extra.any(), f"{what}: visits tiles where nothing is visible (batch, query tile, key tile): {describe(extra)}"
    assert not missing.any(), f"{what}: misses tiles with visible pairs: {describe(missing)}"
    wrong_full = full & ~expected_full
    assert not wrong_full.any(), f"{what}: full tiles with hidden pairs (mask_mod skipped): {describe(wrong_full)}"
    lost_full = expected_full & ~full
    assert not lost_full.any(), f"{what}: wholly visible tiles listed partial: {describe(lost_full)}"
    # the attention-gym habit: the BlockMask the kernel builds from these lists, to_dense()
    mask = BlockMask.from_kv_blocks(*lists, BLOCK_SIZE=FLEX_BLOCK, seq_lengths=(T, S))
    assert torch.equal(mask.to_dense().bool()[:, 0], some), f"{what}: BlockMask.to_dense() differs"


# --------------------------------------------------------------------------- 2. FlexAttention tile lists


def flex_positions(layout: Layout, s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The flex kernels' chunk: padded to exc_block_size rows, a decode step one row."""
    T = e - s
    return layout.positions(s, e, 1 if T == 1 else layout.config.exc_block_size)


def check_layout(layout: Layout, s: int, e: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> None:
    """The positions built here hold what SPEC §3/§4 lets each query see: the initial tokens
    and every later token not in a formed block, each once (so the dense rules below, on
    slots, are SPEC's)."""
    n_init = layout.config.n_init
    ts = layout.tail_start(s)
    real = k_pos[:layout.pool_slot][k_pos[:layout.pool_slot] != EMPTY].tolist()
    assert sorted(real) == list(range(min(n_init, e))) + list(range(max(ts, n_init), e))
    assert (k_pos[layout.local_end:] == EMPTY).all()
    for i in q_pos[q_pos != PAD_QUERY].tolist():  # the whole window is in the slot array
        assert int(local_rule(torch.tensor([i]), k_pos, layout.config.n_local).sum()) == min(i + 1, layout.config.n_local)


@settings(max_examples=150, deadline=None)
@given(geo=chunk_geometries())
@example(geo=GEOMETRY_EXAMPLES[0])
@example(geo=GEOMETRY_EXAMPLES[1])
@example(geo=GEOMETRY_EXAMPLES[2])
def test_chunk_masks_list_exactly_the_visible_tiles(geo):
    """chunk_masks's local and swapped tile lists equal the tiles of SPEC §4's local rule:
    no extra tile, none missing, full exactly where every pair is visible."""
    layout, s, e, G, _ = geo
    n_local = layout.config.n_local
    q_pos, k_pos = flex_positions(layout, s, e)
    check_layout(layout, s, e, q_pos, k_pos)
    masks = chunk_masks(q_pos, k_pos, n_local, G, layout.local_end)
    T, S = q_pos.shape[0], layout.S

    # local call: the chunk's queries against every slot
    dense = with_sentinel(local_rule(q_pos, k_pos, n_local))[None]  # (1, T, S)
    check_tile_lists(masks.local, dense, T, S, (S - 1) // FLEX_BLOCK, "local")

    # swapped call: slots [0, local_end) attend to the queries stacked G times (head-major,
    # as the queries' heads are flattened) and a sentinel
    sw_pos = torch.cat([q_pos.repeat(G), torch.tensor([PAD_QUERY])])
    assert torch.equal(masks.sw_pos, sw_pos)
    n_sw = sw_pos.shape[0]
    slot_pos = k_pos[:layout.local_end]
    dist = sw_pos[None, :] - slot_pos[:, None]  # (local_end, n_sw): query position - slot position
    dense_sw = with_sentinel((dist >= 0) & (dist < n_local))
    check_tile_lists(masks.swapped, dense_sw[None], layout.local_end, n_sw, (n_sw - 1) // FLEX_BLOCK, "swapped")


@settings(max_examples=150, deadline=None)
@given(geo=chunk_geometries())
@example(geo=GEOMETRY_EXAMPLES[0])
@example(geo=GEOMETRY_EXAMPLES[1])
@example(geo=GEOMETRY_EXAMPLES[2])
def test_far_tiles_list_exactly_the_visible_tiles(geo):
    """far_tiles's per-sequence lists equal the tiles of SPEC §4's far rule: slots before
    the pool far iff i - j >= n_local (initial tokens, pending remainder), the sequence's
    selected pool slots (FAR) far from every real query, padding rows only the sentinel."""
    layout, s, e, G, selected = geo
    n_local = layout.config.n_local
    q_pos, k_pos = flex_positions(layout, s, e)
    masks = chunk_masks(q_pos, k_pos, n_local, G, layout.local_end)
    pool_far = layout.pool_marks(selected)
    lists = far_tiles(masks, pool_far, layout.pool_slot, n_local)
    assert all(x.shape[0] == layout.batch for x in lists)
    dense = with_sentinel(far_rule(q_pos, layout.far_pos(k_pos, pool_far), n_local))  # (B, T, S)
    # the rule on slots is SPEC's: a real query sees the selected slots and, before the
    # pool, exactly the real positions at distance >= n_local
    real = q_pos != PAD_QUERY
    assert dense[:, real][..., layout.pool_slot:layout.pool_end].equal(pool_far[:, None].expand(-1, int(real.sum()), -1))
    assert not dense[:, ~real][..., :-1].any()
    event(f"selected blocks: {max(len(row) for row in selected)}")
    check_tile_lists(lists, dense, q_pos.shape[0], layout.S, (layout.S - 1) // FLEX_BLOCK, "far")


def test_far_tiles_without_selection_see_no_pool_tile():
    """No block selected (the chunk's shared lists): no pool tile is visited, only the
    prefix's far tiles and the sentinel; at production defaults."""
    config = MemoryConfig(n_init=128, n_local=640, block_size=128, topk=4, exc_block_size=512,
                          max_cached_blocks=6)
    layout = Layout(config, 2)
    s, e = 2000, 2512
    q_pos, k_pos = flex_positions(layout, s, e)
    masks = chunk_masks(q_pos, k_pos, config.n_local, 3, layout.local_end)
    none = torch.zeros(2, layout.pool_end - layout.pool_slot, dtype=torch.bool)
    lists = far_tiles(masks, none, layout.pool_slot, config.n_local)
    Kt = -(-layout.S // FLEX_BLOCK)
    visited = listed(*lists[:2], Kt) | listed(*lists[2:], Kt)
    pool_tiles = list(range(layout.pool_slot // FLEX_BLOCK, (layout.S - 1) // FLEX_BLOCK))
    assert not visited[..., pool_tiles].any()
    dense = with_sentinel(far_rule(q_pos, layout.far_pos(k_pos, none), config.n_local))
    check_tile_lists(lists, dense, q_pos.shape[0], layout.S, (layout.S - 1) // FLEX_BLOCK, "far, no selection")


# --------------------------------------------------------------------------- 2. window kernel


def window_geometry(layout: Layout, s: int, e: int):
    """What InfLLMState.geometry hands the window kernel for the chunk [s, e)."""
    cfg = layout.config
    T = e - s
    padded, tile, W, reach = window_sizes(1 if T == 1 else cfg.exc_block_size, cfg.n_init, cfg.n_local,
                                          cfg.block_size, layout.local_end)
    q_pos, k_pos = layout.positions(s, e, padded)
    win_idx, win_pos = window_slots(k_pos, padded, layout.last_slot(s, e), T, tile, W)
    return q_pos, k_pos, padded, tile, W, reach, win_idx, win_pos


@settings(max_examples=150, deadline=None)
@given(geo=chunk_geometries())
@example(geo=GEOMETRY_EXAMPLES[0])
@example(geo=GEOMETRY_EXAMPLES[1])
@example(geo=GEOMETRY_EXAMPLES[2])
def test_window_slots_and_reach_cover_exactly_what_each_tile_sees(geo):
    """window_sizes / window_slots: each query tile's window is W = tile + n_local - 1
    consecutive slots (the least a tile of consecutive queries needs) ending at its last
    real query's slot, holding every slot local to its real queries; its far prefix
    [0, reach[t]) holds every slot far to them and stays inside [0, local_end). Window,
    prefix and the selected blocks (block_keys) give each real query exactly its SPEC §4
    keys, none twice; padding rows see nothing."""
    layout, s, e, _, selected = geo
    cfg, T = layout.config, e - s
    n_local = cfg.n_local
    q_pos, k_pos, padded, tile, W, reach, win_idx, win_pos = window_geometry(layout, s, e)
    rows = 1 if T == 1 else cfg.exc_block_size
    assert padded % tile == 0 and rows <= padded < rows + tile and tile <= rows
    assert W == tile + n_local - 1
    n_tiles = padded // tile
    assert win_idx.shape == win_pos.shape == (n_tiles, W) and len(reach) == n_tiles
    assert torch.equal(win_pos, k_pos[win_idx])
    assert (win_idx >= 0).all() and (win_idx < layout.local_end).all(), "a window never leaves [0, local_end)"
    assert all(0 < f <= layout.local_end for f in reach)
    slot_of = {p: j for j, p in enumerate(k_pos.tolist()) if p != EMPTY}  # real positions are unique
    last = layout.last_slot(s, e)
    assert slot_of[e - 1] == last - 1

    pool_far = layout.pool_marks(selected)
    counts = torch.zeros(layout.batch, padded, layout.S, dtype=torch.int32)
    for t in range(n_tiles):
        r0, r1 = t * tile, max(t * tile, min((t + 1) * tile, T))  # the tile's real rows
        first = int(win_idx[t, 0])
        assert torch.equal(win_idx[t], first + torch.arange(W)), "a window is consecutive slots"
        if r0 < r1:
            end = slot_of[s + r1 - 1] + 1  # after the tile's last real query
            assert int(win_idx[t, -1]) + 1 == end or (first == 0 and end <= W), (
                f"tile {t}: window [{first}, {first + W}) should end at slot {end}")
            if r1 - r0 == tile and first > 0:  # a whole tile: it starts at its first query's reach
                assert int(win_pos[t, 0]) == s + r0 - n_local + 1
        pos = q_pos[t * tile:(t + 1) * tile]
        loc = local_rule(pos, win_pos[t], n_local)  # (tile, W)
        far = far_rule(pos, k_pos[:reach[t]], n_local)  # (tile, reach)
        counts[:, t * tile:(t + 1) * tile].index_add_(2, win_idx[t], loc.int().expand(layout.batch, -1, -1).contiguous())
        counts[:, t * tile:(t + 1) * tile, :reach[t]] += far.int()
        # what the kernel needs: every local / far slot of the tile's real queries
        need_loc = local_rule(pos[:r1 - r0], k_pos, n_local).any(dim=0).nonzero().flatten().tolist()
        assert set(need_loc) <= set(win_idx[t].tolist()), f"tile {t}: local slots outside the window"
        need_far = far_rule(pos[:r1 - r0], k_pos[:layout.pool_slot], n_local).any(dim=0).nonzero().flatten()
        assert not len(need_far) or int(need_far.max()) < reach[t], (
            f"tile {t}: far slot {int(need_far.max())} beyond reach {reach[t]}")

    # the selected blocks: block_keys' slots are the pool slots marked far, each once
    for r, row in enumerate(selected):
        one = (torch.tensor([[layout.pool_slot + b * cfg.block_size for b in row]], dtype=torch.long)
               if row else None)
        idx, used = block_keys(one, cfg.topk, cfg.block_size, 1, torch.device("cpu"))
        assert idx.shape == used.shape == (1, cfg.topk * cfg.block_size)
        got = idx[used].tolist()
        assert len(got) == len(set(got)) == len(row) * cfg.block_size
        want = (layout.pool_slot + pool_far[r].nonzero().flatten()).tolist()
        assert sorted(got) == want
        real = q_pos != PAD_QUERY
        counts[r, real.nonzero().flatten()[:, None], torch.tensor(got, dtype=torch.long)[None, :]] += 1

    # window ∪ prefix ∪ blocks = SPEC §4's visible slots (the far rule's, sentinel aside), once each
    spec = (local_rule(q_pos, k_pos, n_local) | far_rule(q_pos, layout.far_pos(k_pos, pool_far), n_local))
    spec[..., -1] = False
    assert counts.max() <= 1, "a slot is seen twice by one query"
    wrong = (counts > 0) != spec
    assert not wrong.any(), f"(batch, row, slot) seen wrongly: {wrong.nonzero()[:8].tolist()}"


@settings(max_examples=60, deadline=None)
@given(config=tile_configs(), data=st.data())
def test_window_reach_is_the_least_uniform_bound(config, data):
    """reach[t] (one per tile, the same for every chunk: static shapes) is attained: at the
    chunk start where the pending remainder is longest (block_size - 1 tokens past the
    last formed block), a whole tile's last query sees slot reach[t] - 1 far."""
    layout = Layout(config, 1)
    bs = config.block_size
    m = data.draw(st.integers(0, 6))
    s = config.n_init + config.n_local + (m + 1) * bs - 1  # n_formed_blocks(s) = m, remainder bs - 1
    assert n_formed_blocks(config, s) == m
    q_pos, k_pos, padded, tile, W, reach, _, _ = window_geometry(layout, s, s + config.exc_block_size)
    for t in range(padded // tile):
        if (t + 1) * tile > config.exc_block_size:
            continue  # a tile with padding rows: its bound is not attained
        pos = q_pos[t * tile:(t + 1) * tile]
        far = far_rule(pos, k_pos[:layout.pool_slot], config.n_local).any(dim=0).nonzero().flatten()
        assert int(far.max()) + 1 == reach[t], (t, int(far.max()), reach[t])
    # a decode step: one query, reach n_init + block_size
    q_pos, k_pos, padded, tile, W, reach, win_idx, _ = window_geometry(layout, s, s + 1)
    assert (padded, tile, W) == (1, 1, config.n_local) and reach == (config.n_init + bs,)
    far = far_rule(q_pos, k_pos[:layout.pool_slot], config.n_local).any(dim=0).nonzero().flatten()
    assert int(far.max()) + 1 == reach[0]
