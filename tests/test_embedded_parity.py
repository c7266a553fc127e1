"""The embedded SmolLM2-135M-Instruct, loaded by us, against transformers' GGUF loader."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from exact_rope import exact_rope  # noqa: E402
from infllm_lite.attention.full import FullAttentionState  # noqa: E402
from infllm_lite.generate import generate_ids  # noqa: E402

PASSAGE = ("The Eiffel Tower, located on the Champ de Mars in Paris, was designed by Gustave "
           "Eiffel's company and completed in 1889 for the World's Fair. It is 330 metres tall. "
           "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
           "Numbers: 3.14159, 2,718, 1e-9, 42%. Emoji: 🚀✨. Deutsch: Grüße aus München. ")


@pytest.fixture(scope="module")
def reference(gguf_path):
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    ref.config._attn_implementation = "sdpa"
    return exact_rope(ref.eval())


@pytest.fixture(scope="module")
def prompt_ids(smollm):
    _, tok = smollm
    messages = [{"role": "user", "content": PASSAGE * 3 + "\nHow tall is the Eiffel Tower?"}]
    ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    assert len(ids) >= 300
    return ids[-300:] if len(ids) > 300 else ids


def test_logits_match_on_a_300_token_prompt(smollm, reference, prompt_ids):
    model, _ = smollm
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # and through the KV cache, in two calls
    state = FullAttentionState(model.args, capacity=len(prompt_ids))
    with torch.no_grad():
        first = model(ids[:, :123], state)
        second = model(ids[:, 123:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), expected, atol=1e-4, rtol=1e-4)


def test_32_greedy_tokens_are_identical(smollm, reference, prompt_ids):
    model, _ = smollm
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        expected, out = [], reference(ids, use_cache=True)  # greedy with transformers' KV cache,
        for _ in range(32):                                  # no stop token: all 32 compared
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            expected.append(int(token))
            out = reference(token, past_key_values=out.past_key_values, use_cache=True)
    assert len(expected) == 32
    got = list(generate_ids(model, prompt_ids, max_new_tokens=32))
    assert got == expected


def test_loading_the_gguf_file_directly_gives_the_same_model(smollm, gguf_path):
    from infllm_lite import load_model
    model, tok = smollm
    direct, direct_tok = load_model(gguf_path, dtype=torch.float32, device="cpu", progress=False)
    ids = torch.tensor([tok.encode("The Eiffel Tower is in")])
    ours, theirs = direct.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():  # the same weights; a few-row product's last bits follow their alignment
        torch.testing.assert_close(direct(ids), model(ids), atol=1e-4, rtol=0)
    assert direct_tok.encode(PASSAGE) == tok.encode(PASSAGE)
    assert direct_tok.stop_token_ids == tok.stop_token_ids
