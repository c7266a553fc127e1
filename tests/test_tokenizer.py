"""infllm_lite.tokenizer against transformers' tokenizer for SmolLM2 (built from the packaged GGUF)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders
from tokenizers import Tokenizer as HFBackend
from tokenizers.models import WordLevel

from infllm_lite.errors import InfLLMLiteError
from infllm_lite.tokenizer import IncrementalDecoder, Tokenizer
from infllm_lite.weights.embedded import embedded_gguf_path, embedded_model_dir

HYPO = settings(max_examples=60, deadline=None)


@pytest.fixture(scope="module")
def hf_tok():
    """The reference: transformers' tokenizer built from the embedded GGUF."""
    transformers = pytest.importorskip("transformers")
    gguf = embedded_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def folder() -> Path:
    """The folder our GGUF converter wrote for the embedded SmolLM2 (cached across runs)."""
    return embedded_model_dir(progress=False)


@pytest.fixture(scope="module")
def hf_saved_folder(hf_tok, tmp_path_factory) -> Path:
    """transformers' own save_pretrained of the same tokenizer (template in chat_template.jinja)."""
    out = tmp_path_factory.mktemp("hf_saved")
    hf_tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tok(folder) -> Tokenizer:
    return Tokenizer.from_dir(folder)


@pytest.fixture(scope="module")
def render_reference():
    """transformers' own chat-template renderer (for templates that are not SmolLM2's)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(template: str, messages, **kwargs) -> str:
        return render_jinja_template([messages], chat_template=template, **kwargs)[0][0]

    return render


def _variant(folder: Path, tmp_path: Path, *, config: dict | None = None, jinja: str | None = None,
             extra_special: list[str] = (), files: dict | None = None, template: bool = True) -> Path:
    """A copy of the SmolLM2 tokenizer folder with a different config / template / added tokens / files."""
    out = tmp_path / "tok"
    out.mkdir()
    backend = HFBackend.from_file(str(folder / "tokenizer.json"))
    if extra_special:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra_special])
    backend.save(str(out / "tokenizer.json"))
    base = json.loads((folder / "tokenizer_config.json").read_text())
    if not template:
        base.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps({**base, **(config or {})}))
    if jinja is not None:
        (out / "chat_template.jinja").write_text(jinja)
    for name, data in (files or {}).items():
        (out / name).write_text(data if isinstance(data, str) else json.dumps(data))
    return out


# --------------------------------------------------------------------------- encode / decode
TEXTS = [
    "",
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return {'a': [x ** 2 for _ in range(10)]}  # comment\n\tpass\n",
    "3.14159 2718281828 1,000,000 -42 0x1F 1e-9 12345678901234567890",
    "emoji 🦙🤗😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷",
    "漢字かなカナ 한국어 中文混合English",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "café naïve résumé Ångström Straße ǅ e\u0301",
    "   leading and trailing   \n\n\n\t\t  spaces  \r\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <|im_end|>x <file_sep> <not_a_token|>",
    "\x00\x01\x7f\u200b\ufeff\ufffd",
]


def test_transformers_saved_folder_loads_the_same(tok, hf_saved_folder):
    saved = Tokenizer.from_dir(hf_saved_folder)
    assert (hf_saved_folder / "chat_template.jinja").is_file()
    assert saved.chat_template == tok.chat_template
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "vocab_size", "stop_token_ids"):
        assert getattr(saved, name) == getattr(tok, name), name
    assert all(saved.encode(t) == tok.encode(t) for t in TEXTS)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, hf_tok, text):
    for add in (True, False):
        ids = tok.encode(text, add_special_tokens=add)
        assert ids == hf_tok.encode(text, add_special_tokens=add)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
    assert tok.decode(ids) == text


@HYPO
@given(text=st.text())
def test_encode_matches_transformers_hypothesis(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text)
    assert tok.decode(ids) == hf_tok.decode(ids)
    # SmolLM2's byte-level vocabulary lacks 21 of the 256 byte tokens (e.g. 0xF1, 0xF2: the lead
    # bytes of U+40000..U+BFFFF), so such characters are dropped on encode, by transformers too.
    if all(tok.decode(tok.encode(ch)) == ch for ch in set(text)):
        assert tok.decode(ids) == text


def test_special_tokens_match_transformers(tok, hf_tok):
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id"):
        assert getattr(tok, name) == getattr(hf_tok, name), name
    assert tok.vocab_size == len(hf_tok) == 49152
    assert 2 in tok.stop_token_ids and tok.id_to_token(2) == "<|im_end|>"
    assert tok.stop_token_ids == {2}
    assert tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id(None) is None


# --------------------------------------------------------------------------- chat templates
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 漢字 🦙?"},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(tok, hf_tok, messages, gen):
    ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
    assert ours == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert tok.chat_template is not None


def test_chat_template_defaults_to_generation_prompt(tok):
    assert tok.apply_chat_template(CONVERSATIONS[0]).endswith("<|im_start|>assistant\n")


_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=40)}
)


@HYPO
@given(messages=st.lists(_message, min_size=1, max_size=5), gen=st.booleans())
def test_chat_template_hypothesis(tok, hf_tok, messages, gen):
    ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
    assert ours == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_llama3_style_template(folder, tmp_path, render_reference):
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    d = _variant(folder, tmp_path, config={"bos_token": "<|begin_of_text|>", "chat_template": LLAMA3},
                 extra_special=specials)
    t = Tokenizer.from_dir(d)
    msgs = CONVERSATIONS[1]
    text = t.apply_chat_template(msgs)
    assert text == render_reference(LLAMA3, msgs, add_generation_prompt=True, bos_token="<|begin_of_text|>")
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>")
    eot = t.token_to_id("<|eot_id|>")
    assert eot is not None and t.stop_token_ids == {eot, t.eos_token_id}


def test_template_features_match_transformers(tok, render_reference):
    # tojson without HTML escaping, namespace, loop controls, dict(), trim_blocks/lstrip_blocks, tools
    template = (
        "{% set ns = namespace(n=0) %}\n"
        "  {% for m in messages %}\n"
        "    {% if m.role == 'system' %}{% continue %}{% endif %}\n"
        "    {% set ns.n = ns.n + 1 %}{{ m | tojson }}|{{ dict(a=1) | tojson }}\n"
        "  {% endfor %}\n"
        "{% generation %}{{ ns.n }} {{ tools | tojson }} {{ eos_token }}{% endgeneration %}"
    )
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "<a & 'b'> é 🦙"}]
    tools = [{"name": "f", "parameters": {"x": "int"}}]
    ours = Tokenizer(tok._tok, special_tokens=tok.special_tokens, chat_templates={"default": template})
    expect = render_reference(template, msgs, tools=tools, eos_token="<|im_end|>", bos_token="<|im_start|>")
    assert ours.apply_chat_template(msgs, tools=tools) == expect


def test_chat_template_list_in_config(folder, tmp_path):
    templates = [
        {"name": "default", "template": "D{{ messages[0]['content'] }}"},
        {"name": "tool_use", "template": "T{{ tools | length }}"},
    ]
    d = _variant(folder, tmp_path, config={"chat_template": templates})
    t = Tokenizer.from_dir(d)
    assert t.chat_template == "D{{ messages[0]['content'] }}"
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "Dx"
    assert t.apply_chat_template([{"role": "user", "content": "x"}], tools=[{}, {}]) == "T2"


def test_jinja_file_overrides_config(folder, tmp_path):
    d = _variant(folder, tmp_path, config={"chat_template": "config"}, jinja="file")
    assert Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "x"}]) == "file"


def test_raise_exception_becomes_user_error(folder, tmp_path):
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with user') }}{% endif %}ok"
    d = _variant(folder, tmp_path, jinja=template)
    t = Tokenizer.from_dir(d)
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(InfLLMLiteError, match="Conversations must start with user"):
        t.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_broken_templates_are_user_errors(folder, tmp_path):
    t = Tokenizer.from_dir(_variant(folder, tmp_path, jinja="{% for %}"))
    with pytest.raises(InfLLMLiteError, match="syntax error"):
        t.apply_chat_template([{"role": "user", "content": "x"}])
    t = Tokenizer(t._tok, chat_templates={"default": "{{ messages[0].content.__class__ }}{{ 1 + 'a' }}"})
    with pytest.raises(InfLLMLiteError, match="chat template .* failed"):
        t.apply_chat_template([{"role": "user", "content": "x"}])


def test_no_chat_template(folder, tmp_path):
    t = Tokenizer.from_dir(_variant(folder, tmp_path, template=False))
    assert t.chat_template is None and t.stop_token_ids == {2}
    with pytest.raises(InfLLMLiteError, match=r"has no chat template; pass a plain string prompt"):
        t.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hello", r"messages should be a list of dicts, got str"),
        ([], r"messages is empty"),
        (["hi"], r"messages\[0\] should be a dict with string 'role' and 'content'"),
        ([{"role": "user"}], r"messages\[0\]"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], r"messages\[1\]"),
        ([{"content": "a"}], r"messages\[0\]"),
    ],
)
def test_bad_messages(tok, messages, match):
    with pytest.raises(InfLLMLiteError, match=match):
        tok.apply_chat_template(messages)


# --------------------------------------------------------------------------- loading
def test_stop_ids_from_generation_config_and_config(folder, tmp_path):
    d = _variant(folder, tmp_path, files={"generation_config.json": {"eos_token_id": [0, 2, 7]},
                                          "config.json": {"eos_token_id": 5}})
    assert Tokenizer.from_dir(d).stop_token_ids == {0, 2, 5, 7}


def test_special_tokens_map_and_added_token_dicts(folder, tmp_path):
    d = _variant(folder, tmp_path, config={"eos_token": {"content": "<|endoftext|>", "special": True}},
                 files={"special_tokens_map.json": {"bos_token": "<file_sep>"}})
    t = Tokenizer.from_dir(d)
    assert (t.eos_token, t.eos_token_id, t.bos_token, t.bos_token_id) == ("<|endoftext|>", 0, "<file_sep>", 5)
    assert t.stop_token_ids == {0, 2}  # eos + the template's <|im_end|>


def test_missing_and_corrupt_files(folder, tmp_path):
    with pytest.raises(InfLLMLiteError, match="is not a directory"):
        Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(InfLLMLiteError, match="has no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(InfLLMLiteError, match="is not a valid tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(folder / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(InfLLMLiteError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": 3}')
    with pytest.raises(InfLLMLiteError, match="chat_template should be a string"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    t = Tokenizer.from_dir(tmp_path)  # tokenizer.json alone is enough
    assert t.eos_token is None and t.stop_token_ids == set() and t.encode("hello") == [28120]


# --------------------------------------------------------------------------- incremental decoding
def _stream(decoder: IncrementalDecoder, ids) -> list[str]:
    return [decoder.add(i) for i in ids] + [decoder.flush()]


def test_emoji_split_across_tokens(tok):
    ids = tok.encode("🦙")
    assert len(ids) == 3
    assert _stream(tok.incremental_decoder(), ids) == ["", "", "🦙", ""]
    pieces = _stream(tok.incremental_decoder(), tok.encode("Hi 👍🏽 漢字"))
    assert pieces == ["Hi", "", "", " 👍", "", "", "🏽", "", "", " 漢", "字", ""]


@HYPO
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=80)
       | st.lists(st.sampled_from(["🦙", "漢", "👍🏽", "é", " ", "a", "<|im_end|>", "\n"]), max_size=20).map("".join),
       skip=st.booleans())
def test_incremental_decode_text(tok, text, skip):
    ids = tok.encode(text)
    full = tok.decode(ids, skip_special_tokens=skip)
    pieces = _stream(tok.incremental_decoder(skip_special_tokens=skip), ids)
    assert "".join(pieces) == full
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in full


@HYPO
@given(ids=st.lists(st.integers(0, 49151), max_size=30), skip=st.booleans())
def test_incremental_decode_arbitrary_ids(tok, ids, skip):
    # Random byte-level ids may form invalid UTF-8: the pieces must still add up.
    pieces = _stream(tok.incremental_decoder(skip_special_tokens=skip), ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)


def _sentencepiece_style(decoder) -> Tokenizer:
    """A tiny Llama-2-like vocabulary: ▁-prefixed pieces, byte-fallback tokens, <s>/</s>."""
    pieces = ["<unk>", "<s>", "</s>", "▁", "▁Hello", "▁world", "a", "▁b", "世", "▁▁"]
    pieces += [f"<0x{b:02X}>" for b in (0x20, 0x41, 0xF0, 0x9F, 0xA6, 0x99, 0xE4, 0xB8, 0x96)]
    backend = HFBackend(WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    backend.decoder = decoder
    return Tokenizer(backend, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})


SP_DECODERS = {
    "llama2": lambda: decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)]),
    "metaspace": lambda: decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()]),
}


@pytest.mark.parametrize("kind", SP_DECODERS)
def test_incremental_decode_sentencepiece_style(kind):
    t = _sentencepiece_style(SP_DECODERS[kind]())
    n = t.vocab_size

    @HYPO
    @given(ids=st.lists(st.integers(0, n - 1), max_size=16), skip=st.booleans())
    def check(ids, skip):
        full = t.decode(ids, skip_special_tokens=skip)
        pieces = _stream(t.incremental_decoder(skip_special_tokens=skip), ids)
        assert "".join(pieces) == full
        assert all("\ufffd" not in p for p in pieces) or "\ufffd" in full

    check()
    # the leading-space strip applies once, at the very start
    ids = [1, 4, 5, 2, 5]
    assert _stream(t.incremental_decoder(), ids) == ["", "Hello", " world", "", " world", ""]
    assert t.decode(ids, skip_special_tokens=True) == "Hello world world"
