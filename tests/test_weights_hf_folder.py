"""HF folders (config.json, plain and sharded safetensors) and model-source resolution
(folder, .gguf file, hub id through a monkeypatched ``snapshot_download``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from infllm_lite.errors import InfLLMLiteError
from infllm_lite.weights.hf_folder import read_hf_config, read_hf_state_dict
from infllm_lite.weights.hub import ALLOW_PATTERNS, parse_hub_id, resolve_source

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8}


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=g),
        "model.norm.weight": torch.ones(8),
        "step": torch.tensor([3], dtype=torch.int64),
    }


def make_folder(folder: Path, shards: int = 1, index: bool = True) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    sd = tensors()
    if shards == 1:
        save_file(sd, folder / "model.safetensors")
        return sd
    names = sorted(sd)
    weight_map = {}
    for k in range(shards):
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: sd[n] for n in names[k::shards]}
        save_file(part, folder / shard)
        weight_map |= {n: shard for n in part}
    if index:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sd


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------------------- config.json


def test_read_config(tmp_path):
    make_folder(tmp_path)
    assert read_hf_config(tmp_path) == CONFIG


def test_config_errors(tmp_path):
    with pytest.raises(InfLLMLiteError, match=r"missing does not exist"):
        read_hf_config(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InfLLMLiteError, match=r"file\.txt is not a folder"):
        read_hf_config(tmp_path / "file.txt")
    with pytest.raises(InfLLMLiteError, match=r"has no config\.json: not a Hugging Face model folder"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 8,')
    with pytest.raises(InfLLMLiteError, match=r"config\.json is not valid JSON"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(InfLLMLiteError, match=r"config\.json does not hold a JSON object"):
        read_hf_config(tmp_path)


# ---------------------------------------------------------------------------- safetensors


def test_single_file(tmp_path):
    sd = make_folder(tmp_path)
    assert_same(read_hf_state_dict(tmp_path), sd)


@pytest.mark.parametrize("index", [True, False])
def test_sharded(tmp_path, index):
    sd = make_folder(tmp_path, shards=3, index=index)
    assert_same(read_hf_state_dict(tmp_path), sd)


def test_dtype_cast(tmp_path):
    sd = make_folder(tmp_path)
    out = read_hf_state_dict(tmp_path, dtype=torch.float16)
    assert out["model.embed_tokens.weight"].dtype == torch.float16
    assert out["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float16
    assert out["step"].dtype == torch.int64  # integers are left alone
    assert torch.equal(out["model.norm.weight"], sd["model.norm.weight"].half())


def test_index_names_missing_shard(tmp_path):
    make_folder(tmp_path, shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InfLLMLiteError, match=r"names the shard model-00002-of-00002\.safetensors, which is missing"):
        read_hf_state_dict(tmp_path)


def test_bad_index(tmp_path):
    make_folder(tmp_path, shards=2)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(InfLLMLiteError, match=r"index\.json is not a valid safetensors index"):
        read_hf_state_dict(tmp_path)


def test_no_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InfLLMLiteError, match=r"has no \*\.safetensors weights$"):
        read_hf_state_dict(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(InfLLMLiteError, match=r"\.bin weights are not supported: convert them to safetensors"):
        read_hf_state_dict(tmp_path)


def test_state_dict_folder_errors(tmp_path):
    with pytest.raises(InfLLMLiteError, match=r"nothing does not exist"):
        read_hf_state_dict(tmp_path / "nothing")


def _damage(data: bytes, how: str) -> bytes:
    return {
        "truncated": data[: len(data) // 2],
        "cut in the header": data[:20],
        "10 bytes short": data[:-10],
        "empty": b"",
        "garbage": np.random.default_rng(0).bytes(len(data)),
        "garbage header": data[:8] + b"{not json" + data[17:],
    }[how]


@pytest.mark.parametrize("how", ["truncated", "cut in the header", "10 bytes short", "empty", "garbage",
                                 "garbage header"])
def test_damaged_file(tmp_path, how):
    make_folder(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(_damage(path.read_bytes(), how))
    with pytest.raises(InfLLMLiteError, match=r"model\.safetensors is not a readable safetensors file, probably "
                                              r"truncated or corrupt \(.*\): download it again"):
        read_hf_state_dict(tmp_path)


def test_damaged_shard_is_named(tmp_path):
    make_folder(tmp_path, shards=2)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(InfLLMLiteError, match=r"model-00002-of-00002\.safetensors is not a readable"):
        read_hf_state_dict(tmp_path)


def test_duplicate_tensor_across_shards(tmp_path):
    make_folder(tmp_path, shards=1)
    save_file({"model.norm.weight": torch.zeros(8)}, tmp_path / "extra.safetensors")
    (tmp_path / "model.safetensors").rename(tmp_path / "a.safetensors")
    with pytest.raises(InfLLMLiteError, match=r"tensor model\.norm\.weight is stored twice"):
        read_hf_state_dict(tmp_path)


# ---------------------------------------------------------------------------- resolve_source


def test_resolve_local(tmp_path):
    assert resolve_source(tmp_path) == tmp_path
    assert resolve_source(str(tmp_path)) == tmp_path
    gguf = tmp_path / "m.GGUF"
    gguf.write_bytes(b"GGUF")
    assert resolve_source(gguf) == gguf
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(InfLLMLiteError, match=r"w\.bin is a file but not a \.gguf"):
        resolve_source(tmp_path / "w.bin")


@pytest.mark.parametrize("source", ["./no/such/dir", "/no/such/dir", "nothing-here", "a/b/c", "x.gguf"])
def test_resolve_missing_path(source, monkeypatch):
    monkeypatch.setattr("huggingface_hub.snapshot_download", _no_network)
    with pytest.raises(InfLLMLiteError, match=rf"^{source} does not exist$"):
        resolve_source(source)


def _no_network(*args, **kwargs):
    raise AssertionError("must not reach the hub")


@pytest.mark.parametrize(
    "source,repo,revision",
    [("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", None),
     ("Qwen/Qwen2.5-0.5B-Instruct@main", "Qwen/Qwen2.5-0.5B-Instruct", "main"),
     ("mistralai/Mistral-7B-v0.1@refs/pr/1", "mistralai/Mistral-7B-v0.1", "refs/pr/1")],
)
def test_resolve_hub_id(source, repo, revision, monkeypatch, tmp_path):
    calls = []

    def fake_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, allow_patterns, kwargs))
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_download)
    assert resolve_source(source) == tmp_path
    assert calls == [(repo, revision, ALLOW_PATTERNS, {})]
    assert set(ALLOW_PATTERNS) == {
        "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"}


def test_existing_folder_wins_over_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.setattr("huggingface_hub.snapshot_download", _no_network)
    assert resolve_source("owner/name") == Path("owner/name")


def test_hub_errors_are_wrapped(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("Cannot reach the Hub and the files are not in the local cache.\nmore text")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(InfLLMLiteError, match=r"^could not download owner/model@v2 from the Hugging Face hub: "
                                              r"Cannot reach the Hub and the files are not in the local cache\. "
                                              r"\(if you meant a local path, it does not exist\)$") as info:
        resolve_source("owner/model@v2")
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)

    def not_found(*args, **kwargs):
        raise OSError("404 Client Error: Repository Not Found for url")

    monkeypatch.setattr("huggingface_hub.snapshot_download", not_found)
    with pytest.raises(InfLLMLiteError, match=r"could not download a/b from the Hugging Face hub: 404 Client Error"):
        resolve_source("a/b")


@pytest.mark.parametrize("text,expected", [
    ("owner/name", ("owner/name", None)), ("o-1/n.a_m-e@v1.0", ("o-1/n.a_m-e", "v1.0")),
    ("owner/", None), ("/abs/path", None), ("a/b/c", None), ("./x", None), ("owner/name@", None),
    ("owner/..", None), ("C:\\models\\x", None),
])
def test_parse_hub_id(text, expected):
    assert parse_hub_id(text) == expected
