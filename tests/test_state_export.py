"""Attention memories export and restore: a restored memory continues exactly as the
original (every mode; InfLLM with blocks cached, on disk, and lru-s values)."""

import pytest
import torch

from infllm_lite.attention import make_attention_state
from infllm_lite.errors import InfLLMLiteError
from infllm_lite.memory_config import MemoryConfig

MEMORIES = {
    "lru": MemoryConfig(n_init=4, n_local=32, block_size=8, topk=2, exc_block_size=16,
                        max_cached_blocks=3),
    "lru-s + disk": MemoryConfig(n_init=4, n_local=32, block_size=8, topk=2, exc_block_size=16,
                                 max_cached_blocks=3, cache_policy="lru-s", max_host_bytes=40_000),
}


def _state(mode, model, memory, capacity=400):
    return make_attention_state(mode, model.args, capacity=capacity, memory=memory, kernel="torch")


@pytest.mark.parametrize("mode, memory", [("full", None), ("streaming", "lru"), ("infllm", "lru"),
                                          ("infllm", "lru-s + disk")])
def test_restored_memory_continues_identically(tiny, mode, memory):
    model, _ = tiny
    memory = MEMORIES.get(memory)
    ids = torch.randint(0, model.args.vocab_size, (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        original = _state(mode, model, memory)
        for a in range(0, 250, 97):  # several calls, not aligned to anything
            model(ids[:, a:min(a + 97, 250)], original)
        tensors, meta = original.export()
        tensors = {k: v.clone() for k, v in tensors.items()}  # a copy, as a file would be
        restored = _state(mode, model, memory)
        restored.restore(tensors, meta)
        assert restored.length == original.length == 250
        for a in range(250, 300, 7):  # continue both: prefill calls, then single tokens
            chunk = ids[:, a:a + 7]
            torch.testing.assert_close(model(chunk, restored), model(chunk, original), rtol=0, atol=0)
        for t in range(3):
            token = ids[:, t:t + 1]
            torch.testing.assert_close(model(token, restored), model(token, original), rtol=0, atol=0)
    if mode == "infllm":
        assert restored.stats() == original.stats()
        if memory.max_host_bytes is not None:
            assert original.stats().blocks_disk > 0  # the snapshot read blocks back from disk
        original.close()
        restored.close()


def test_restore_refuses_what_does_not_fit(tiny):
    model, _ = tiny
    ids = torch.randint(0, model.args.vocab_size, (1, 120), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        state = _state("infllm", model, MEMORIES["lru"])
        model(ids, state)
        tensors, meta = state.export()
        with pytest.raises(InfLLMLiteError, match="fresh"):
            state.restore(tensors, meta)
        other = MemoryConfig(n_init=4, n_local=48, block_size=8, topk=2, exc_block_size=16,
                             max_cached_blocks=3)
        with pytest.raises(InfLLMLiteError, match="shape"):
            _state("infllm", model, other).restore(tensors, meta)
        full = _state("full", model, None, capacity=200)
        model(ids, full)
        t, m = full.export()
        with pytest.raises(InfLLMLiteError, match="capacity"):
            _state("full", model, None, capacity=100).restore(t, m)
