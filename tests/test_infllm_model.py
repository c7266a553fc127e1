"""InfLLM at model level on the embedded SmolLM2-135M-Instruct (SPEC §4 consequences),
and passkey retrieval beyond the model's 8K window, with and without the disk tier."""

from dataclasses import replace

import pytest
import torch

from infllm_lite import GenerationStats, InfLLMLiteError, MemoryConfig, generate, generate_ids
from infllm_lite.attention import make_attention_state
from infllm_lite.eval.passkey import make_passkey_sample, score_passkey
from infllm_lite.generate import encode_prompt, stop_token_ids
from infllm_lite.memory_config import n_formed_blocks

SMALL = MemoryConfig(n_init=16, n_local=128, block_size=32, topk=2, repr_topk=4, exc_block_size=64,
                     max_cached_blocks=4)


def _logits(model, ids, mode, memory, calls):
    state = make_attention_state(mode, model.args, capacity=ids.shape[1], memory=memory)
    out, start = [], 0
    with torch.inference_mode():
        for size in calls:
            out.append(model(ids[:, start:start + size], state))
            start += size
    return torch.cat(out, dim=1), state


def test_within_the_window_infllm_is_full_attention(smollm):
    model, tok = smollm
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 30)])[:, :300]
    with torch.inference_mode():
        full = model(ids)
    got, _ = _logits(model, ids, "infllm", MemoryConfig.for_model(model.args), [300])
    torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)
    got, _ = _logits(model, ids, "infllm", replace(SMALL, n_local=300), [100, 1, 199])
    torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)


def test_results_do_not_depend_on_the_model_call_size(smollm):
    """Beyond the window (blocks formed and retrieved), splitting the prompt into calls at
    execution-chunk boundaries changes nothing."""
    model, tok = smollm
    ids = torch.tensor([tok.encode("Alice met Bob in Paris in 1999, then moved to Rome. " * 40)])[:, :640]
    reference, state = _logits(model, ids, "infllm", SMALL, [640])
    assert state.layers[0].n_blocks > SMALL.topk  # retrieval really chose among blocks
    for calls in ([64] * 10, [128, 512], [320, 320]):
        got, _ = _logits(model, ids, "infllm", SMALL, calls)
        torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-4)
    text = generate(model, tok, "Alice met Bob in Paris. " * 60, attention="infllm", memory=SMALL,
                    max_new_tokens=8)
    for chunk_size in (64, 192):
        assert generate(model, tok, "Alice met Bob in Paris. " * 60, attention="infllm", memory=SMALL,
                        max_new_tokens=8, chunk_size=chunk_size) == text


def test_bad_memory_configs_are_refused_before_any_work():
    cases = [
        (dict(exc_block_size=600, n_local=512), "exc_block_size (600) must be <= n_local (512)"),
        (dict(topk=40, max_cached_blocks=32), "topk (40) must be <= max_cached_blocks (32)"),
        (dict(block_size=0), "block_size must be a positive integer"),
        (dict(repr_topk=8, block_size=4), "repr_topk (8) must be <= block_size (4)"),
        (dict(n_init=-1), "n_init must be a non-negative integer"),
        (dict(cache_policy="fifo"), "cache_policy must be one of"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InfLLMLiteError) as err:
            MemoryConfig(**kwargs)
        assert message in str(err.value)


@pytest.fixture(scope="module")
def passkey_16k(smollm):
    """16K tokens, twice the model's native 8K window; the needle at depth 0.4, far outside
    the local window; asked through the chat template."""
    _, tok = smollm
    sample = make_passkey_sample(tok, n_tokens=16800, depth=0.4, seed=1)
    assert sample.n_tokens >= 16384
    return sample


def _answer_ids(model, tok, sample, memory, stats):
    ids = encode_prompt(tok, sample.messages)
    stops = stop_token_ids(model, tok)
    return list(generate_ids(model, ids, attention="infllm", max_new_tokens=12, memory=memory,
                             stop_token_ids=stops, stats=stats))


def test_infllm_finds_the_passkey_beyond_the_window(smollm, passkey_16k):
    """Twice the model's native window: InfLLM answers, every formed block kept in host
    memory, and its 32 fast slots per layer both hit and miss."""
    model, tok = smollm
    memory = MemoryConfig.for_model(model.args)
    stats = GenerationStats()
    answer = _answer_ids(model, tok, passkey_16k, memory, stats)
    assert score_passkey(tok.decode(answer), passkey_16k.key), tok.decode(answer)
    m = stats.memory
    assert m.blocks_disk == 0 and m.blocks >= model.args.n_layers * n_formed_blocks(memory, passkey_16k.n_tokens)
    assert m.misses > 0 and m.hits > 0 and m.evictions > 0  # 32 slots for 123 blocks a layer


def test_most_blocks_on_disk_change_no_token(smollm, tmp_path):
    """The same generation with the slow tier capped so that most blocks live on disk gives
    exactly the same tokens (the disk tier round-trips bit for bit), and the pools' counters
    say where the blocks were; the offload file is gone afterwards. 3K tokens, 19 blocks a
    layer, 5 fast slots (so blocks are evicted and read back)."""
    model, tok = smollm
    sample = make_passkey_sample(tok, n_tokens=3072, depth=0.3, seed=2)
    memory = MemoryConfig.for_model(model.args, max_cached_blocks=5)
    uncapped = GenerationStats()
    answer = _answer_ids(model, tok, sample, memory, uncapped)
    m = uncapped.memory
    assert m.blocks_disk == 0 and m.misses > 0 and m.evictions > 0

    args = model.args
    block_bytes = 2 * args.n_kv_heads * memory.block_size * args.head_dim * 4  # K and V, float32
    capped_memory = replace(memory, max_host_bytes=3 * block_bytes * args.n_layers, offload_dir=str(tmp_path))
    capped = GenerationStats()
    assert _answer_ids(model, tok, sample, capped_memory, capped) == answer
    c = capped.memory
    assert c.blocks == m.blocks and c.blocks_host == 3 * args.n_layers and c.blocks_disk > 0.8 * c.blocks
    assert (c.hits, c.misses, c.evictions) == (m.hits, m.misses, m.evictions)  # tiers do not change the cache
    assert c.bytes_host_to_disk >= c.blocks_disk * block_bytes and c.bytes_disk_to_host > 0
    assert list(tmp_path.iterdir()) == []  # the pools closed their offload files


def test_streaming_loses_the_passkey_outside_its_window(smollm):
    """4K tokens are enough: the key (depth 0.4, about 1.6K tokens back) is far outside
    StreamingLLM's 512-token window, and the sample is cheaper than the 16K one."""
    model, tok = smollm
    sample = make_passkey_sample(tok, n_tokens=4096, depth=0.4, seed=1)
    answer = generate(model, tok, sample.messages, attention="streaming", max_new_tokens=12)
    assert not score_passkey(answer, sample.key), answer
