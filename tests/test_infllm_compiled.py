"""The compiled kernels (FlexAttention, and the dense window kernel the CPU uses by
default) against the plain one, at the embedded model's geometry (9 heads, 3 KV heads,
head dim 64, its default MemoryConfig), so the graphs compiled here are the ones the
model-level tests reuse.

The uncompiled kernels are held to the dense reference under
hypothesis in test_infllm_layer.py; here compiled == plain on a sequence long enough to
form blocks and retrieve top-k, split into prefill calls and decode steps, and the whole
run compiles each shape once.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from infllm_lite.attention.base import attend_in_calls
from infllm_lite.attention.infllm import InfLLMState
from infllm_lite.attention.kernels import FlexKernel
from infllm_lite.config import ModelArgs
from infllm_lite.memory_config import MemoryConfig, n_formed_blocks
from infllm_lite.rope import RotaryEmbedding

ARGS = ModelArgs(model_type="llama", vocab_size=16, dim=576, n_layers=1, n_heads=9, n_kv_heads=3,
                 head_dim=64, intermediate_size=8, rope_theta=100000.0, max_position_embeddings=8192)
CONFIG = MemoryConfig.for_model(ARGS)  # n_init 128, n_local 512, block 128, topk 4, exc 512
CALLS = [700, 1, 1100, 617, 1, 1, 1]  # partial chunks, then decode steps


def run(kernel: str, q, k, v, calls=CALLS, representative_kernel=False):
    state = InfLLMState(ARGS, CONFIG, kernel=kernel)
    state.record = True
    if representative_kernel:  # the Triton scores on the CPU too (interpreted)
        state.kernel = FlexKernel(compiled=kernel == "flex", triton_scores=True)
    with torch.inference_mode():
        out = attend_in_calls(state, q, k, v, calls, RotaryEmbedding(ARGS))
    return out, state.layers[0]


@pytest.fixture(scope="module")
def qkv():
    g = torch.Generator().manual_seed(0)
    L = sum(CALLS)
    return (torch.randn(1, 9, L, 64, generator=g), torch.randn(1, 3, L, 64, generator=g),
            torch.randn(1, 3, L, 64, generator=g))


@pytest.mark.parametrize("kernel", ["flex", "window"])
def test_compiled_kernel_equals_plain_kernel(qkv, kernel):
    assert n_formed_blocks(CONFIG, sum(CALLS)) > CONFIG.topk  # retrieval really chooses
    flex_out, flex_layer = run(kernel, *qkv)
    plain_out, plain_layer = run("torch", *qkv)
    torch.testing.assert_close(flex_out, plain_out, atol=1e-4, rtol=1e-4)
    assert [(s, e) for s, e, _ in flex_layer.trace] == [(s, e) for s, e, _ in plain_layer.trace]
    for (_, _, a), (_, _, b) in zip(flex_layer.trace, plain_layer.trace):
        assert torch.equal(a, b)
    assert flex_layer.n_blocks == plain_layer.n_blocks
    torch.testing.assert_close(flex_layer.block_repr, plain_layer.block_repr, atol=1e-5, rtol=1e-5)


def test_representative_scores_kernel_path_equals_the_swapped_call(qkv):
    """The path CUDA takes (representative scores from infllm_lite.kernels, here its torch
    twin) forms the same blocks and attends the same as the swapped flex call."""
    out, layer = run("flex", *qkv)
    out_k, layer_k = run("flex", *qkv, representative_kernel=True)
    torch.testing.assert_close(out_k, out, atol=1e-5, rtol=1e-5)
    for (_, _, a), (_, _, b) in zip(layer_k.trace, layer.trace):
        assert torch.equal(a, b)
    torch.testing.assert_close(layer_k.block_repr, layer.block_repr, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["flex", "window"])
def test_a_whole_generation_compiles_once(qkv, kernel):
    """Chunks (padded to exc_block_size) and decode steps are the only two shapes: a second
    run with other call sizes, other data and so other selections adds no graph."""
    run(kernel, *qkv)  # warm (possibly already compiled by another test)
    before = counters["stats"]["unique_graphs"]
    q, k, v = (x.flip(2) for x in qkv)
    run(kernel, q, k, v, calls=[1, 1299, 1, 1, 1117, 1, 1])
    assert counters["stats"]["unique_graphs"] == before


def test_no_host_synchronisation_in_the_attention_code():
    """No .item(), .tolist(), .cpu() or .numpy() in the per-chunk attention code (SPEC §9):
    counts are host integers derived from positions; selections stay on the device. The one
    host read left is the block pool's page table (memory/pool.py ``ensure_resident``)."""
    src = Path(__file__).resolve().parents[1] / "src" / "infllm_lite" / "attention"
    for name in ("infllm.py", "flex_joint.py", "window_joint.py"):
        code = (src / name).read_text()
        assert not re.search(r"\.(item|tolist|cpu|numpy)\(", code), name
