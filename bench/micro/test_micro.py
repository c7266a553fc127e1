"""Micro-benchmarks of the hot pieces, at the embedded SmolLM2-135M's sizes:

    OMP_NUM_THREADS=1 python -m pytest bench/micro --benchmark-only -q

* ``infllm-layer-prefill`` / ``infllm-layer-decode``: one InfLLM attention layer whose
  memory holds ``FILL_BLOCKS`` blocks, one execution chunk of ``exc_block_size`` queries /
  one decode step, compiled flex and compiled window against the plain ``torch`` kernel;
* ``select-blocks``: retrieval (mean query · representative vectors, top-k), torch twin;
* ``representative-scores``: the summed local probabilities of a chunk, torch twin;
* ``pool``: ``BlockPool.ensure_resident`` of a top-k selection, all hits, all misses from
  host memory, all misses from the disk tier;
* ``model-decode``: a decode step of the whole model with full attention at ``CONTEXT``
  tokens, eager against ``torch.compile(model.step)`` (extra info: GB/s of the cost model);
* ``few-row-lm-head``: the LM head over 1-8 rows, ``F.linear`` against ``W · xᵀ``.

Compilation and memory filling happen in fixtures or warm-up rounds, never timed. Each
benchmark that advances a state runs on a copy of its own; every round feeds the next
tokens, as prefill and decode do. Not collected by the default ``pytest`` (testpaths).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import replace

import pytest
import torch

from infllm_lite.attention.base import attend_in_calls
from infllm_lite.attention.full import FullAttentionState
from infllm_lite.attention.infllm import InfLLMState
from infllm_lite.attention.kernels import make_kernel
from infllm_lite.kernels.block_relevance import select_blocks
from infllm_lite.kernels.representative_scores import representative_scores_torch
from infllm_lite.memory import BlockPool
from infllm_lite.memory_config import MemoryConfig
from infllm_lite.rope import RotaryEmbedding
from roofline import Cost, embedded_args

FILL_BLOCKS = 64  # memory blocks per layer before the layer benchmarks
CONTEXT = 2048  # tokens before the model's decode step
PREFILL_ROUNDS, DECODE_ROUNDS = 3, 20
KERNELS = ("flex", "window", "torch")  # compiled FlexAttention, compiled dense window, every logit materialised


@pytest.fixture(scope="module", autouse=True)
def inference():
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def memory() -> MemoryConfig:
    return MemoryConfig.for_model(embedded_args())


# --------------------------------------------------------------------------- one InfLLM layer


class LayerStream:
    """One InfLLM layer fed the next tokens of a fixed random q/k/v stream."""

    def __init__(self, state: InfLLMState, qkv: tuple[torch.Tensor, ...], rope: RotaryEmbedding):
        self.state, self.qkv, self.rope = state, qkv, rope

    def feed(self, n: int) -> torch.Tensor:
        """Attend the next n tokens (one model call); returns (1, H, n, d)."""
        a = self.state.length
        q, k, v = (x[:, :, a:a + n] for x in self.qkv)
        return attend_in_calls(self.state, q, k, v, [n], self.rope)


@pytest.fixture(scope="module")
def filled_layer(memory) -> LayerStream:
    """A one-layer InfLLM state at the embedded model's geometry holding FILL_BLOCKS blocks,
    filled once with the compiled kernel (the fastest: this also compiles the chunk shape)."""
    args = replace(embedded_args(), n_layers=1)
    fill = memory.n_init + memory.n_local + FILL_BLOCKS * memory.block_size
    total = fill + (PREFILL_ROUNDS + 1) * memory.exc_block_size + DECODE_ROUNDS + 2
    g = torch.Generator().manual_seed(0)
    qkv = tuple(torch.randn(1, h, total, args.head_dim, generator=g)  # (1, heads, total, d)
                for h in (args.n_heads, args.n_kv_heads, args.n_kv_heads))
    stream = LayerStream(InfLLMState(args, memory, kernel="flex"), qkv, RotaryEmbedding(args))
    stream.feed(fill)
    assert stream.state.layers[0].n_blocks == FILL_BLOCKS
    return stream


def layer_copy(filled: LayerStream, kernel: str) -> LayerStream:
    """An independent copy of the filled layer that attends with ``kernel``."""
    state = copy.deepcopy(filled.state)  # the pool's fast tier stays a view of the copy's slots
    state.kernel = make_kernel(kernel, "cpu")  # used per chunk; the memory itself does not depend on it
    return LayerStream(state, filled.qkv, filled.rope)


@pytest.mark.parametrize("kernel", KERNELS)
def test_infllm_layer_prefill_chunk(benchmark, filled_layer, memory, kernel):
    stream = layer_copy(filled_layer, kernel)
    benchmark.group = "infllm-layer-prefill"
    benchmark.extra_info.update(queries=memory.exc_block_size, blocks=FILL_BLOCKS)
    benchmark.pedantic(stream.feed, args=(memory.exc_block_size,), rounds=PREFILL_ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("kernel", KERNELS)
def test_infllm_layer_decode_step(benchmark, filled_layer, kernel):
    stream = layer_copy(filled_layer, kernel)
    benchmark.group = "infllm-layer-decode"
    benchmark.extra_info.update(blocks=FILL_BLOCKS)
    benchmark.pedantic(stream.feed, args=(1,), rounds=DECODE_ROUNDS, warmup_rounds=2)  # warm-up compiles


# --------------------------------------------------------------------------- kernels' torch twins


@pytest.mark.parametrize("queries", [1, 512], ids=["decode", "chunk"])
@pytest.mark.parametrize("n_blocks", [256, 2048], ids=["256-blocks", "2048-blocks"])
def test_select_blocks(benchmark, memory, n_blocks, queries):
    a = embedded_args()
    g = torch.Generator().manual_seed(0)
    q_far = torch.randn(1, a.n_heads, queries, a.head_dim, generator=g)  # (1, H, T, d)
    block_repr = torch.randn(1, n_blocks, a.n_heads * a.head_dim, generator=g)  # (1, N, H·d)
    benchmark.group = "select-blocks"
    selected = benchmark(select_blocks, q_far, block_repr, n_blocks, memory.topk)
    assert selected.shape == (1, memory.topk)


def test_representative_scores(benchmark, memory):
    """A chunk of exc_block_size queries over the slots that can be local (initial tokens
    and the tail: pending remainder, window, the chunk), as the CUDA path calls it."""
    a, m = embedded_args(), memory
    start = m.n_init + m.n_local + FILL_BLOCKS * m.block_size  # the chunk's first position
    tail = m.n_local + m.block_size + m.exc_block_size  # the tail's capacity
    q_pos = torch.arange(start, start + m.exc_block_size)  # (T,)
    k_pos = torch.cat([torch.arange(m.n_init), torch.arange(start + m.exc_block_size - tail,
                                                            start + m.exc_block_size)])  # (S,)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, a.n_heads, len(q_pos), a.head_dim, generator=g)  # (1, H, T, d)
    k = torch.randn(1, a.n_kv_heads, len(k_pos), a.head_dim, generator=g)  # (1, Hkv, S, d)
    lse = torch.full((1, a.n_heads, len(q_pos)), 8.0)  # (1, H, T): its values do not change the work
    benchmark.group = "representative-scores"
    out = benchmark(representative_scores_torch, q, k, q_pos, k_pos, lse, m.n_local)
    assert out.shape == (1, a.n_heads, len(k_pos))


# --------------------------------------------------------------------------- the block pool


POOL_BLOCKS = 256


@pytest.mark.parametrize("case", ["hit", "miss-host", "miss-disk"])
def test_pool_ensure_resident(benchmark, memory, tmp_path, case):
    """A chunk's top-k selection made resident: the same blocks every time (all hits), or
    the next top-k of POOL_BLOCKS in turn (all misses: more blocks than fast slots), read
    from host memory or, with a host budget of 16 blocks, mostly from the offload file."""
    a, m = embedded_args(), memory
    shape = (1, a.n_kv_heads, POOL_BLOCKS, m.block_size, a.head_dim)  # (B, Hkv, n, bs, d)
    block_bytes = 2 * 4 * a.n_kv_heads * m.block_size * a.head_dim  # K and V of one block
    pool = BlockPool(1, a.n_kv_heads, m.block_size, a.head_dim, n_slots=m.max_cached_blocks,
                     max_host_bytes=16 * block_bytes if case == "miss-disk" else None,
                     offload_dir=str(tmp_path), device="cpu")
    g = torch.Generator().manual_seed(0)
    pool.append(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    turns = itertools.count()

    def select() -> torch.Tensor:
        first = 0 if case == "hit" else next(turns) * m.topk % POOL_BLOCKS
        return pool.ensure_resident(torch.arange(first, first + m.topk))  # (topk,) slots

    benchmark.group = "pool"
    benchmark.pedantic(select, rounds=50, warmup_rounds=m.max_cached_blocks // m.topk)  # warm-up fills the slots
    stats = pool.stats()
    assert stats.misses == (m.topk if case == "hit" else stats.chunks * m.topk)
    pool.close()


# --------------------------------------------------------------------------- the whole model


@pytest.fixture(scope="module")
def model():
    from infllm_lite import load_model

    return load_model(None, dtype=torch.float32, device="cpu", progress=False)[0]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_model_decode_step(benchmark, model, compiled):
    """One decode step at CONTEXT tokens, full attention (the KV cache's contents do not
    change the work, so it is not prefilled: only its length is set)."""
    warmup, rounds = 2, 10
    state = FullAttentionState(model.args, CONTEXT + warmup + rounds, static=compiled)
    state.length = CONTEXT
    step = torch.compile(model.step, dynamic=False, fullgraph=True) if compiled else model.step
    token = torch.zeros(1, 1, dtype=torch.long)  # (1, 1)

    def decode() -> torch.Tensor:
        logits = step(token, state.positions(1), state)  # (1, 1, vocab)
        state.advance(1)
        return logits

    benchmark.group = f"model-decode-{CONTEXT}"
    benchmark.pedantic(decode, rounds=rounds, warmup_rounds=warmup)  # warm-up compiles
    nbytes = Cost(model.args).decode_bytes_per_token(CONTEXT)
    benchmark.extra_info.update(context=CONTEXT, mb_per_token=nbytes / 1e6,
                                gb_s=nbytes / benchmark.stats.stats.median / 1e9)


@pytest.mark.parametrize("rows", [1, 2, 4, 8])
@pytest.mark.parametrize("form", ["x_wt", "w_xt"])
def test_few_row_lm_head(benchmark, rows, form):
    """The 49152 x 576 LM head over a decode step's rows: ``F.linear`` (x · Wᵀ) against
    ``W · xᵀ``, what ``models.linear.Linear`` runs for up to 16 rows on the CPU."""
    weight = torch.randn(49152, 576)
    x = torch.randn(rows, 576)
    fn = (lambda: torch.nn.functional.linear(x, weight)) if form == "x_wt" else (lambda: (weight @ x.T).T)
    benchmark.group = f"few-row-lm-head-{rows}"
    benchmark.pedantic(fn, rounds=20, warmup_rounds=3)
