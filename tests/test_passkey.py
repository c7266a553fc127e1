"""The passkey haystack generator (InfiniteBench's recipe, sized in tokens), its scoring rule,
and the long-context demo on a short haystack."""

import pytest

from infllm_lite.cli import main
from infllm_lite.errors import InfLLMLiteError
from infllm_lite.eval import make_passkey_sample, score_passkey
from infllm_lite.generate import encode_prompt


@pytest.mark.parametrize("n_tokens", [1024, 4096, 12288])
def test_prompt_length_is_within_two_percent(tokenizer, n_tokens):
    for depth in (0.0, 0.5, 1.0):
        sample = make_passkey_sample(tokenizer, n_tokens, depth, seed=3)
        ids = encode_prompt(tokenizer, sample.messages)  # exactly what generate() prefills
        assert len(ids) == sample.n_tokens
        assert abs(sample.n_tokens - n_tokens) <= 0.02 * n_tokens


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.33, 0.5, 0.9, 1.0])
def test_needle_once_at_the_requested_depth(tokenizer, depth):
    sample = make_passkey_sample(tokenizer, 2000, depth, seed=7)
    needle = f"The pass key is {sample.key}. Remember it. {sample.key} is the pass key."
    assert sample.needle == needle
    assert sample.context.count(needle) == 1 and sample.prompt_text.count(needle) == 1
    assert sample.prompt_text.count(sample.key) == 2
    at = sample.context.index(needle)
    noise_chars = len(sample.context) - len(needle) - 1  # the needle is a line of its own
    assert abs(at / noise_chars - depth) <= 0.05
    # between noise lines, as InfiniteBench places it
    assert at == 0 or sample.context[at - 1] == "\n"
    assert sample.context[at + len(needle)] == "\n"
    # needle_token points at the needle's first token in the prompt ids
    ids = encode_prompt(tokenizer, sample.messages)
    assert tokenizer.decode(ids[sample.needle_token:sample.needle_token + 6]).startswith("The pass key")


def test_infinitebench_format(tokenizer):
    sample = make_passkey_sample(tokenizer, 1024, 0.5, seed=0)
    (message,) = sample.messages
    assert message["role"] == "user"
    content = message["content"]
    assert content.startswith("There is an important info hidden inside a lot of irrelevant text. "
                              "Find it and memorize them. I will quiz you about the important "
                              "information there.\n\nThe grass is green. The sky is blue. The sun "
                              "is yellow. Here we go. There and back again.\n")
    assert content.endswith("\n\nWhat is the pass key?")
    assert content == ("There is an important info hidden inside a lot of irrelevant text. Find it "
                       "and memorize them. I will quiz you about the important information there."
                       f"\n\n{sample.context}\n\nWhat is the pass key?")
    assert sample.prompt_text == tokenizer.apply_chat_template(sample.messages, add_generation_prompt=True)
    assert len(sample.key) == 5 and sample.key.isdigit()


def test_deterministic_by_seed_and_keys_differ(tokenizer):
    a = make_passkey_sample(tokenizer, 1500, 0.4, seed=11)
    b = make_passkey_sample(tokenizer, 1500, 0.4, seed=11)
    assert a == b
    keys = {make_passkey_sample(tokenizer, 300, 0.4, seed=s).key for s in range(10)}
    assert len(keys) == 10
    # the seed picks the key only: same haystack, other key
    c = make_passkey_sample(tokenizer, 1500, 0.4, seed=12)
    assert c.key != a.key and c.context.replace(c.key, a.key) == a.context


def test_bad_arguments(tokenizer):
    with pytest.raises(InfLLMLiteError, match="too small"):
        make_passkey_sample(tokenizer, 20, 0.5, seed=0)
    with pytest.raises(InfLLMLiteError, match="depth"):
        make_passkey_sample(tokenizer, 1000, 1.5, seed=0)
    with pytest.raises(InfLLMLiteError, match="n_tokens"):
        make_passkey_sample(tokenizer, 0, 0.5, seed=0)


@pytest.mark.parametrize("prediction, expected", [
    ("The pass key is 12345.", True),
    ("12345", True),
    (" 12345 is the pass key. Remember it.", True),
    ("1234", False),
    ("123456", False),
    ("No idea", False),
    ("", False),
    ("71432 and 12345", False),
    ("12,345", False),  # the first integer is 12
    ("Key: 12345-67", True),
])
def test_score_passkey(prediction, expected):
    assert score_passkey(prediction, "12345") is expected


def test_score_passkey_keeps_leading_zeros():
    assert score_passkey("The pass key is 01234.", "01234")
    assert not score_passkey("The pass key is 1234.", "01234")


def test_demo_on_a_short_haystack(capsys, tokenizer):
    code = main(["demo", "--length", "1500", "--attention", "streaming", "--no-full"])
    out, err = capsys.readouterr()
    assert code == 0, err
    key = make_passkey_sample(tokenizer, 1500, 0.5, seed=0).key
    assert "native window 8192" in out and "streaming memory:" in out
    assert "answer:" in out and "prefill" in out
    # the key (depth 0.5, about 750 tokens back) is outside StreamingLLM's 640 tokens
    assert f"true key: {key}  ->  WRONG" in out


def test_demo_with_infllm_compiles_before_the_timed_reading(capsys, tokenizer):
    code = main(["demo", "--length", "1500", "--no-full"])  # infllm is the demo's default
    out, err = capsys.readouterr()
    assert code == 0, err
    key = make_passkey_sample(tokenizer, 1500, 0.5, seed=0).key
    assert out.index("[infllm] compiling the attention") < out.index("[infllm] reading 1")
    assert "infllm memory: 128 initial + 512 local tokens" in out
    # InfLLM retrieves the key from a block beyond its local window (checked: "The pass key is
    # 66048. Remember it.")
    assert f"answer:   The pass key is {key}." in out and f"true key: {key}  ->  RIGHT" in out
