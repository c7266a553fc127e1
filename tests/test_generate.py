"""generate(): streaming, stop strings, stop tokens, sampling, compiled decode, bad input."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infllm_lite import InfLLMLiteError, MemoryConfig, generate, generate_ids
from infllm_lite.generate import (continue_ids, encode_prompt, read_ids, stop_token_ids,
                                  stream_text)
from infllm_lite.text_stream import StopStrings
from infllm_lite.memory_config import n_formed_blocks
from infllm_lite.sampling import sample

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def test_streaming_yields_exactly_the_non_streaming_text(smollm):
    model, tok = smollm
    text = generate(model, tok, QUESTION, max_new_tokens=24)
    pieces = list(generate(model, tok, QUESTION, max_new_tokens=24, stream=True))
    assert "".join(pieces) == text
    assert len(pieces) > 3  # really streamed, piece by piece
    assert "Paris" in text


def test_answer_stops_at_end_of_turn(smollm):
    model, tok = smollm
    prompt_ids = encode_prompt(tok, QUESTION)
    ids = list(generate_ids(model, prompt_ids, max_new_tokens=100,
                            stop_token_ids=tok.stop_token_ids))
    assert 0 < len(ids) < 100  # ended by <|im_end|>, not by the limit
    assert tok.token_to_id("<|im_end|>") not in ids


def test_chat_messages_go_through_the_template(tokenizer):
    ids = encode_prompt(tokenizer, QUESTION)
    text = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_token_ids_are_used_as_given(tiny):
    model, tok = tiny
    ids = encode_prompt(tok, "Once upon a time")
    assert encode_prompt(tok, ids) == ids and encode_prompt(tok, tuple(ids)) == ids
    assert generate(model, tok, ids, max_new_tokens=8) == generate(model, tok, "Once upon a time",
                                                                   max_new_tokens=8)


def test_stop_string_cuts_before_its_first_occurrence(tiny):
    model, tok = tiny
    full = generate(model, tok, "Once upon a time", max_new_tokens=40)
    assert len(full) > 20
    stop = full[10:14]
    cut = generate(model, tok, "Once upon a time", max_new_tokens=40, stop=["@@never@@", stop])
    assert cut == full[:full.index(stop)]
    streamed = "".join(generate(model, tok, "Once upon a time", max_new_tokens=40, stop=stop, stream=True))
    assert streamed == cut


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="abc\n", max_size=40), stops=st.lists(st.text(alphabet="abc\n", max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 40), max_size=10))
def test_stop_strings_property(text, stops, cuts):
    """Any split of any text into pieces: the output is the text up to the earliest stop."""
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    cutter, out, hit = StopStrings(stops), "", False
    for piece in pieces:
        shown, hit = cutter.push(piece)
        out += shown
        if hit:
            break
    if not hit:
        out += cutter.flush()
    found = [text.find(s) for s in stops if s and s in text]
    assert out == (text[:min(found)] if found else text)


def test_sampling_is_reproducible_with_a_seed(tiny):
    model, tok = tiny
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50)
    a = generate(model, tok, "Hello", seed=3, **kw)
    assert a == generate(model, tok, "Hello", seed=3, **kw)
    assert "".join(generate(model, tok, "Hello", seed=3, stream=True, **kw)) == a


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    top1 = {int(sample(logits, temperature=1.0, top_k=1, generator=g)) for _ in range(50)}
    assert top1 == {1}
    top2 = {int(sample(logits, temperature=1.0, top_k=2, generator=g)) for _ in range(200)}
    assert top2 == {1, 2}
    nucleus = {int(sample(logits, temperature=1.0, top_p=0.5, generator=g)) for _ in range(100)}
    assert nucleus == {1}  # token 1 alone carries more than half of the mass
    assert int(sample(logits)) == 1


TINY_MEMORY = MemoryConfig(n_init=4, n_local=32, block_size=8, topk=2, repr_topk=2,
                           exc_block_size=16, max_cached_blocks=2)


def test_infllm_generation_streams_samples_and_stops(tiny):
    """attention="infllm" with a prompt well beyond its window (blocks formed, top-k
    retrieved) streams, samples reproducibly and stops at stop strings as full attention
    does; the uncompiled flex calls and the plain kernel give the same text (the compiled
    kernel is exercised on the embedded model by test_infllm_model.py)."""
    model, tok = tiny
    prompt = "Once upon a time there was a memory. " * 12  # ~100 tokens, window 32
    kw = dict(attention="infllm", memory=TINY_MEMORY, attention_kernel="flex-eager", max_new_tokens=30)
    full = generate(model, tok, prompt, **kw)
    assert len(full) > 12
    assert generate(model, tok, prompt, **{**kw, "attention_kernel": "torch"}) == full
    stop = full[6:10]
    cut = generate(model, tok, prompt, stop=stop, **kw)
    assert cut == full[:full.index(stop)]
    assert "".join(generate(model, tok, prompt, stop=stop, stream=True, **kw)) == cut
    sampling = dict(temperature=1.0, top_p=0.9, seed=3)
    a = generate(model, tok, prompt, **sampling, **kw)
    assert a == generate(model, tok, prompt, **sampling, **kw)
    assert "".join(generate(model, tok, prompt, stream=True, **sampling, **kw)) == a


def test_return_stats_counts_tokens_phases_and_the_memory(tiny):
    """return_stats gives (text, GenerationStats): token counts, phase times, and for infllm
    the pools' counters over all layers (per phase too); streaming fills them at the end."""
    model, tok = tiny
    prompt = "Once upon a time there was a memory. " * 12
    kw = dict(attention="infllm", memory=TINY_MEMORY, attention_kernel="flex-eager", max_new_tokens=20)
    text, stats = generate(model, tok, prompt, return_stats=True, **kw)
    assert text == generate(model, tok, prompt, **kw)
    assert stats.prompt_tokens == len(tok.encode(prompt)) and 0 < stats.new_tokens <= 20
    assert stats.prefill_seconds > 0 and stats.prefill_tokens_per_second > 0
    m, pre, dec = stats.memory, stats.prefill_memory, stats.decode_memory
    assert m.blocks == model.args.n_layers * n_formed_blocks(TINY_MEMORY, stats.prompt_tokens + stats.new_tokens - 1)
    assert m.blocks_disk == 0 and m.blocks_host == m.blocks and m.blocks_fast <= model.args.n_layers * 2
    assert m.hits + m.misses > 0 and m.chunks == pre.chunks + dec.chunks
    assert m.bytes_slow_to_fast == m.misses * 2 * model.args.n_kv_heads * 8 * model.args.head_dim * 4
    assert "hit rate" in stats.summary() and stats.to_dict()["memory"]["hit_rate"] == m.hit_rate
    pieces, streamed = generate(model, tok, prompt, stream=True, return_stats=True, **kw)
    assert streamed.new_tokens == 0 and "".join(pieces) == text and streamed.new_tokens == stats.new_tokens
    assert streamed.memory == stats.memory
    _, plain = generate(model, tok, prompt, return_stats=True, max_new_tokens=5)
    assert plain.memory is None and plain.decode_memory is None and "memory" not in plain.summary()


def test_chunked_prefill_gives_the_same_tokens(tiny):
    model, tok = tiny
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 5)
    expected = list(generate_ids(model, ids, max_new_tokens=12))
    for chunk in (1, 7, 16):
        assert list(generate_ids(model, ids, max_new_tokens=12, chunk_size=chunk)) == expected


def test_compiled_decode_gives_the_same_tokens(tiny):
    model, tok = tiny
    ids = tok.encode("In a hole in the ground there lived")
    eager = list(generate_ids(model, ids, max_new_tokens=10))
    assert list(generate_ids(model, ids, max_new_tokens=10, compile=True)) == eager


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=""), "the prompt is empty"),
    (dict(prompt="   \n"), "the prompt is empty"),
    (dict(prompt=[]), "the prompt is empty"),
    (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_k=-2), "top_k must be >= 0"),
    (dict(chunk_size=0), "chunk_size must be at least 1"),
    (dict(attention="sparse"), "unknown attention mode 'sparse'"),
    (dict(attention="infllm", attention_kernel="triton"), "unknown attention kernel 'triton'"),
    (dict(attention_kernel="triton"), "unknown attention kernel 'triton'"),  # whatever the mode
    (dict(attention="infllm", compile=True), "compile=True applies to attention='full' only"),
    (dict(prompt=[{"role": "user"}]), "content"),
])
def test_bad_arguments_raise_clear_errors(tiny, kwargs, message):
    model, tok = tiny
    kwargs = {"prompt": "Hello", **kwargs}
    with pytest.raises(InfLLMLiteError, match=re.escape(message)):
        generate(model, tok, kwargs.pop("prompt"), stream=True, **kwargs)  # raised before iterating


def test_auto_kernel_is_window_on_the_cpu_and_flex_elsewhere():
    from infllm_lite.attention import kernel_name
    assert kernel_name("auto", "cpu") == "window"
    assert kernel_name("auto", "cuda") == "flex"
    assert kernel_name("flex", "cpu") == "flex"
    with pytest.raises(InfLLMLiteError, match="unknown attention kernel 'fast'"):
        kernel_name("fast", "cpu")


@pytest.mark.parametrize("mode", ["full", "streaming", "infllm"])
def test_a_finished_generation_frees_its_memory_without_the_garbage_collector(tiny, monkeypatch, mode):
    """The layers' references to their state are dropped when the generation ends: no
    reference cycle keeps the caches alive until the collector's next pass (measured at
    8K on the embedded model: 0.4 GiB held after each InfLLM generation)."""
    import gc
    import importlib
    import weakref

    gen = importlib.import_module("infllm_lite.generate")  # the module, not the function

    made, make = [], gen.make_attention_state

    def make_and_watch(*args, **kwargs):
        state = make(*args, **kwargs)
        made.append(weakref.ref(state))
        return state

    monkeypatch.setattr(gen, "make_attention_state", make_and_watch)
    model, tok = tiny
    gc.disable()
    try:
        ids = list(generate_ids(model, tok.encode("a memory. " * 20), max_new_tokens=3, attention=mode,
                                memory=None if mode == "full" else TINY_MEMORY,
                                attention_kernel="window-eager"))
        assert len(ids) == 3 and made[0]() is None
    finally:
        gc.enable()


def test_stop_token_ids_are_the_tokenizers_and_the_models(tiny):
    model, tok = tiny
    ids = stop_token_ids(model, tok)
    assert ids == set(tok.stop_token_ids) | set(model.args.eos_token_ids)
    assert tok.token_to_id("<|im_end|>") in ids and 2 in ids


def test_stream_text_decodes_and_stops_pulling_tokens_at_a_stop_string(tokenizer):
    ids = tokenizer.encode("Snow fell on the harbour. The ferries stopped. Spring came.", add_special_tokens=False)
    ids += [tokenizer.token_to_id("<|im_end|>")]  # special tokens are skipped
    pulled = []

    def tokens():
        for i in ids:
            pulled.append(i)
            yield i

    pieces = list(stream_text(tokenizer, tokens()))
    assert "".join(pieces) == "Snow fell on the harbour. The ferries stopped. Spring came." and len(pieces) > 5
    pulled.clear()
    assert "".join(stream_text(tokenizer, tokens(), [" The ferries"])) == "Snow fell on the harbour."
    assert len(pulled) < len(ids) - 3  # nothing was pulled beyond the stop string


def test_read_then_continue_is_one_prefill(tiny):
    """read_ids (no prediction) then continue_ids gives the tokens one prefill of the whole
    prompt gives, for every chunk size: the two share one chunked prefill."""
    from infllm_lite.attention import make_attention_state
    model, tok = tiny
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 5)
    expected = list(generate_ids(model, ids, max_new_tokens=8))
    for chunk in (3, 16, 4096):
        state = make_attention_state("full", model.args, capacity=len(ids) + 8, dtype=torch.float32,
                                     device="cpu")
        read_ids(model, state, ids[:30], chunk_size=chunk)
        assert state.length == 30
        sampling = dict(temperature=0.0, top_p=1.0, top_k=0, generator=None)
        assert list(continue_ids(model, state, ids[30:], max_new_tokens=8, sampling=sampling,
                                 chunk_size=chunk)) == expected
        state.close()
