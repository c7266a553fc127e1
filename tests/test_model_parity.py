"""Our Llama / Mistral / Qwen2 against transformers on random small configs."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from exact_rope import exact_rope  # noqa: E402
from infllm_lite.attention.full import FullAttentionState  # noqa: E402
from infllm_lite.config import ModelArgs  # noqa: E402
from infllm_lite.models.build import build_model  # noqa: E402

BASE = dict(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)

CASES = {
    "llama-gqa-untied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama-tied-headdim": ("LlamaConfig", "LlamaForCausalLM",
                           dict(tie_word_embeddings=True, head_dim=24, num_key_value_heads=6)),
    "llama3-rope-scaling": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=64))),
    "llama-linear-rope-bias": ("LlamaConfig", "LlamaForCausalLM", dict(
        attention_bias=True, mlp_bias=True, rope_scaling=dict(rope_type="linear", factor=2.0))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, num_key_value_heads=3)),
    "mistral-sliding-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=37)),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
}


def _pair(case):
    config_cls, model_cls, extra = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**BASE, **extra})
    config._attn_implementation = "sdpa"
    ref = exact_rope(getattr(transformers, model_cls)(config).float().eval())
    with torch.no_grad():  # random init leaves biases at 0 and norms at 1: perturb everything
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = build_model(ModelArgs.from_hf_config(config.to_dict()), ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case):
    ref, ours = _pair(case)
    ids = torch.randint(0, BASE["vocab_size"], (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_tokens_match_transformers(case):
    """20 greedy tokens with our KV cache (chunked prefill) equal transformers.generate."""
    ref, ours = _pair(case)
    prompt = torch.randint(0, BASE["vocab_size"], (1, 45), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                                do_sample=False, min_new_tokens=20, pad_token_id=0)[0, 45:].tolist()
        state = FullAttentionState(ours.args, capacity=80)
        ours(prompt[:, :30], state)  # prefill in two calls of different sizes
        logits = ours(prompt[:, 30:], state, last_only=True)
        got = []
        for _ in range(20):
            token = int(logits[0, -1].argmax())
            got.append(token)
            logits = ours(torch.tensor([[token]]), state)
    assert got == expected


@pytest.mark.parametrize("heads", [(9, 3), (4, 4), (6, 1)])
@pytest.mark.parametrize("S", [1, 5, 130, 1030])
@pytest.mark.parametrize("masked", [True, False])
def test_one_query_attention_equals_sdpa(heads, S, masked):
    """The decode step's attention (flash below ``FLASH_MAX_KEYS`` keys, two matmuls sharing
    each KV head past it or under a mask) against SDPA, with hidden keys (the static
    cache's unfilled slots, a sliding window) or every key visible."""
    import torch.nn.functional as F
    from infllm_lite.causal import FLASH_MAX_KEYS, one_query_attention
    assert 130 < FLASH_MAX_KEYS <= 1030  # both kernels are drawn
    H, Hkv = heads
    g = torch.Generator().manual_seed(S)
    q, k, v = torch.randn(2, H, 1, 16, generator=g), torch.randn(2, Hkv, S, 16, generator=g), torch.randn(2, Hkv, S, 16, generator=g)
    mask = torch.rand(1, S, generator=g) < 0.7
    mask[0, 0] = True  # one key at least is visible
    if not masked:
        mask = None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(one_query_attention(q, k, v, mask), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [(9, 3), (4, 4)])
@pytest.mark.parametrize("P, T", [(1, 1), (1, 7), (130, 5), (64, 200)])
def test_prefix_causal_attention_equals_masked_sdpa(heads, P, T):
    """A chunk after a cached prefix (the second prefill call of full attention): two flash
    calls merged by their log-sum-exp against SDPA with the explicit causal mask."""
    import torch.nn.functional as F
    from infllm_lite.causal import prefix_causal_attention
    H, Hkv = heads
    g = torch.Generator().manual_seed(P + T)
    q = torch.randn(2, H, T, 16, generator=g)
    k, v = torch.randn(2, Hkv, P + T, 16, generator=g), torch.randn(2, Hkv, P + T, 16, generator=g)
    mask = torch.arange(P, P + T)[:, None] >= torch.arange(P + T)[None, :]  # (T, P + T)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = prefix_causal_attention(q, k[:, :, :P], v[:, :, :P], k[:, :, P:], v[:, :, P:])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
