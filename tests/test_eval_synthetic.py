"""The generated retrieval tasks (InfiniteBench's recipes, sized in the model's tokens):
length, the needle once at the requested depth, the official prompt layout, determinism."""

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infllm_lite.errors import InfLLMLiteError
from infllm_lite.eval.synthetic import SYNTHETIC_TASKS, kv_pairs, make_synthetic_sample
from infllm_lite.eval.tasks import get_task
from infllm_lite.generate import encode_prompt


def _ids(tokenizer, sample):
    return encode_prompt(tokenizer, [{"role": "user", "content": sample.prompt}])


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
@pytest.mark.parametrize("n_tokens", [4096, 12289])  # kv: 2% > one pair (~70 tokens) from 3.5K on
def test_length_within_two_percent(tokenizer, task, n_tokens):
    for depth in (0.0, 0.5, 1.0):
        sample = make_synthetic_sample(task, tokenizer, n_tokens, depth, seed=5)
        ids = _ids(tokenizer, sample)  # exactly what the eval prefills
        assert len(ids) == sample.meta["n_tokens"]
        assert abs(len(ids) - n_tokens) <= 0.02 * n_tokens
        assert sample.meta["length"] == n_tokens and sample.meta["depth"] == depth


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(task=st.sampled_from(SYNTHETIC_TASKS), n_tokens=st.integers(300, 3500),
       depth=st.floats(0, 1), seed=st.integers(0, 10**6))
def test_short_prompts_are_sized_too(tokenizer, task, n_tokens, depth, seed):
    """Below 3.5K tokens a kv pair (~70 tokens) is more than 2%: within one pair there."""
    sample = make_synthetic_sample(task, tokenizer, n_tokens, depth, seed)
    error = abs(len(_ids(tokenizer, sample)) - n_tokens)
    assert error <= max(0.02 * n_tokens, 80 if task == "kv_retrieval" else 0)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.6, 1.0])
def test_kv_needle_once_at_depth(tokenizer, depth):
    sample = make_synthetic_sample("kv_retrieval", tokenizer, 3000, depth, seed=2)
    (value,) = sample.answers
    key = sample.meta["key"]
    body = sample.prompt.split("JSON data:\n", 1)[1].split("\n\n\nKey: ", 1)[0]
    pairs = json.loads(body)
    assert len(pairs) == sample.meta["n_pairs"] and pairs[key] == value
    keys = list(pairs)
    assert keys.index(key) == round(depth * (len(keys) - 1))
    # the key is named by the instruction and the question and listed once; the value once
    assert sample.prompt.count(key) == 3 and sample.prompt.count(value) == 1
    assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", k)
               for k in keys[:5])
    ids = _ids(tokenizer, sample)
    at = sample.meta["needle_token"]
    assert "\"" in tokenizer.decode(ids[at:at + 1])  # the token holding the key's opening quote
    assert f"\"{key[:4]}" in tokenizer.decode(ids[at:at + 8])


@pytest.mark.parametrize("task", ["passkey", "number_string"])
@pytest.mark.parametrize("depth", [0.0, 0.4, 1.0])
def test_needle_once_at_depth(tokenizer, task, depth):
    sample = make_synthetic_sample(task, tokenizer, 2500, depth, seed=4)
    (key,) = sample.answers
    assert sample.prompt.count(key) == 2  # "... is K. Remember it. K is ..."
    lines = sample.prompt.split("\n\n", 1)[1].rsplit("\n\n", 1)[0].strip("\n").split("\n")
    (at,) = [i for i, line in enumerate(lines) if key in line]
    assert abs(at / (len(lines) - 1) - depth) <= 0.05
    ids = _ids(tokenizer, sample)
    first = tokenizer.decode(ids[sample.meta["needle_token"]:sample.meta["needle_token"] + 4])
    assert first.startswith("The")


def test_number_string_key_follows_the_recipe(tokenizer):
    """Five digits, then five insertions of a digit's copy next to it: ten digits, and each
    insertion adds one pair of equal neighbours (InfiniteBench's construction)."""
    keys = set()
    for seed in range(30):
        (key,) = make_synthetic_sample("number_string", tokenizer, 400, 0.5, seed).answers
        assert re.fullmatch(r"[0-9]{10}", key)
        assert sum(a == b for a, b in zip(key, key[1:])) >= 5
        keys.add(key)
    assert len(keys) == 30


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_official_prompt_layout(tokenizer, task):
    """The prompt is the official template around the generated context and question."""
    sample = make_synthetic_sample(task, tokenizer, 800, 0.5, seed=0)
    spec = get_task(task)
    assert spec.chat
    head, tail = spec.template.split("{context}")
    if task == "kv_retrieval":
        head = head.format(key=f'"{sample.meta["key"]}"')
    assert sample.prompt.startswith(head)
    question = tail.split("{input}")[0]
    assert question in sample.prompt[len(head):]
    if task == "passkey":
        assert sample.prompt.endswith("\n\nWhat is the pass key?")
    elif task == "number_string":
        assert sample.prompt.endswith("\n\nWhat is the sequence of digits?")
    else:
        key = sample.meta["key"]
        assert sample.prompt.startswith(f'Extract the value corresponding to the specified key "{key}" '
                                        'in the JSON object below.\n\nJSON data:\n{"')
        assert sample.prompt.endswith(f'}}\n\n\nKey: "{key}"\n'
                                      "The value associated with the specified key is: ")


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_deterministic_by_seed(tokenizer, task):
    a = make_synthetic_sample(task, tokenizer, 1500, 0.3, seed=9)
    assert a == make_synthetic_sample(task, tokenizer, 1500, 0.3, seed=9)
    b = make_synthetic_sample(task, tokenizer, 1500, 0.3, seed=10)
    assert a.answers != b.answers and a.id != b.id


def test_kv_pairs_extend():
    assert kv_pairs(3, 10)[:4] == kv_pairs(3, 4)
    assert len({k for k, _ in kv_pairs(3, 500)}) == 500


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_bad_arguments(tokenizer, task):
    with pytest.raises(InfLLMLiteError, match="too small"):
        make_synthetic_sample(task, tokenizer, 20, 0.5, seed=0)
    with pytest.raises(InfLLMLiteError, match="depth"):
        make_synthetic_sample(task, tokenizer, 1000, -0.1, seed=0)
    with pytest.raises(InfLLMLiteError, match="n_tokens"):
        make_synthetic_sample(task, tokenizer, 0, 0.5, seed=0)


def test_unknown_task(tokenizer):
    with pytest.raises(InfLLMLiteError, match="kv_retrieval"):
        make_synthetic_sample("narrativeqa", tokenizer, 1000, 0.5, seed=0)
