"""Import a GGUF checkpoint (llama.cpp's format) as HF-named float32 tensors.

``read_gguf`` gives everything a Hugging Face model folder would hold: an HF-style
``config.json`` dict, the tensors under HF names (dequantized to float32 with
``gguf.quants.dequantize``), a ``tokenizers`` tokenizer.json and a tokenizer_config dict
(built in :mod:`.gguf_tokenizer`).
``convert_gguf`` writes that folder atomically, so later loads skip the dequantization.

What llama.cpp's converter (``convert_hf_to_gguf.py``) changed, and is undone here:

* names: ``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight`` etc.;
* for ``llama`` only (``LlamaModel.permute``), the rows of ``attn_q``/``attn_k`` (weights and
  biases) are permuted per head for llama.cpp's interleaved RoPE; undoing it gives HF's
  "rotate-half" layout. ``qwen2`` is converted without it (``Qwen2Model`` is not a
  ``LlamaModel``), as transformers' GGUF loader also assumes;
* a tied output layer is simply absent (no ``output.weight``): ``tie_word_embeddings``.

``read_gguf(path, packed=True)`` keeps Q8_0/Q4_0/Q4_1/Q4_K/Q6_K linear weights (and the
token embedding) packed: each becomes a :class:`QuantizedLinear` (``gguf_pack``) with no
float32 copy: Q4_0/Q4_1's blocks *are* int4 packs (``d``/``m`` -> scales/offsets, Q4_0
offsets ``-8 d``), Q8_0 is grouped int8, Q4_K int4 with groups of 32 (its nibbles
regrouped), Q6_K int8 with groups of 16; their dequantization equals
``gguf.quants.dequantize`` bit for bit. Other quantized types (Q5_K, IQ*, ...) are
refused before any tensor is read.

Mistral GGUFs use the ``llama`` architecture; they load as ``LlamaForCausalLM`` (the same
network; a GGUF does not record Mistral's sliding window).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ModelArgs
from ..errors import InfLLMLiteError
from ..models.quantized import QuantizedLinear, pack_int4
from ..rope import rope_inv_freq
from .gguf_tokenizer import build_tokenizer

# GGUF architecture -> (HF architectures[0], HF model_type)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")


@dataclass
class GGUFCheckpoint:
    """A GGUF file read into what a Hugging Face model folder holds (``packs``: with
    ``packed=True``, the HF names of the weights kept packed -> their layers)."""

    config: dict
    tensors: dict[str, torch.Tensor]
    tokenizer_json: str
    tokenizer_config: dict
    packs: dict[str, QuantizedLinear] | None = None


PACKED_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")  # GGUF quantizations kept packed
_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
_BLOCK = {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q4_K": 256, "Q6_K": 256}  # weights per block


def _f16(b: np.ndarray) -> torch.Tensor:
    """(..., 2) bytes -> (...) float16 values."""
    return torch.from_numpy(np.ascontiguousarray(b).view(np.float16)[..., 0])


def _q4_k(b: np.ndarray, out: int, n: int) -> QuantizedLinear:
    """Q4_K: 256-weight super-blocks of 8 sub-blocks of 32: ``w = (d sc) q - dmin m``
    (6-bit ``sc``, ``m``), i.e. int4 with groups of 32, ``s = d sc``, ``o = -(dmin m)``
    (both exact in float32). Its nibbles pair sub-blocks 2j and 2j+1: regrouped here
    into ours (integer work, no float copy of the weights)."""
    d, dmin = _f16(b[..., 0:2]).float(), _f16(b[..., 2:4]).float()  # (out, blocks)
    sc = b[..., 4:16].reshape(out, -1, 3, 4)
    lo, hi, mix = sc[:, :, 0], sc[:, :, 1], sc[:, :, 2]
    scale = np.concatenate([lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)  # (out, blocks, 8)
    mins = np.concatenate([hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)], axis=-1)
    qs = b[..., 16:].reshape(out, -1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)
    q = torch.from_numpy(np.ascontiguousarray(qs & 0x0F).reshape(out, n))
    scales = (d[..., None] * torch.from_numpy(scale.astype(np.float32))).reshape(out, -1)
    offsets = -(dmin[..., None] * torch.from_numpy(mins.astype(np.float32))).reshape(out, -1)
    return QuantizedLinear("int4", n, out, 32, pack_int4(q, 32), scales, offsets)


def _q6_k(b: np.ndarray, out: int, n: int) -> QuantizedLinear:
    """Q6_K: 256-weight super-blocks of 16 groups of 16: ``w = (d sc) (q - 32)``, 6-bit
    ``q``, int8 ``sc``: grouped int8 with groups of 16, ``s = d sc`` (exact in float32)."""
    ql = b[..., :128].reshape(out, -1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(out, -1, 8, 32)
    qh = b[..., 128:192].reshape(out, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)
    qh = (qh & 0x03).reshape(out, -1, 8, 32)
    q = ((ql | (qh << 4)).astype(np.int8) - np.int8(32)).reshape(out, n)
    sc = torch.from_numpy(np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32))  # (out, blocks, 16)
    scales = (_f16(b[..., 208:210]).float()[..., None] * sc).reshape(out, -1)
    return QuantizedLinear("int8", n, out, 16, torch.from_numpy(q), scales)


def gguf_pack(blocks: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantizedLinear:
    """A Q8_0/Q4_0/Q4_1/Q4_K/Q6_K tensor's raw rows (``(out, bytes)`` uint8, as
    ``GGUFReader`` gives them) as a :class:`QuantizedLinear` of ``shape`` (out, in)."""
    out, n = shape
    if type_name not in PACKED_TYPES or n % _BLOCK[type_name]:
        raise InfLLMLiteError(f"GGUF type {type_name} is not packed here (packed: {', '.join(PACKED_TYPES)})")
    groups = n // 32
    b = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(out, n // _BLOCK[type_name], -1)
    if type_name == "Q4_K":
        return _q4_k(b, out, n)
    if type_name == "Q6_K":
        return _q6_k(b, out, n)
    b = b.reshape(out, groups, -1)
    d = _f16(b[..., 0:2])  # (out, groups)
    if type_name == "Q8_0":
        q = torch.from_numpy(b[..., 2:].copy().view(np.int8).reshape(out, n))
        return QuantizedLinear("int8", n, out, 32, q, d)
    if type_name == "Q4_1":
        offsets = _f16(b[..., 2:4])
        qs = b[..., 4:]
    else:  # Q4_0: d * (q - 8) = q * d + (-8 d), exactly (8 d is exact; the sum is representable)
        offsets = -8 * d
        qs = b[..., 2:]
    return QuantizedLinear("int4", n, out, 32, torch.from_numpy(qs.copy()), d, offsets)


# ---------------------------------------------------------------------------- reading


def _reader_class():
    import gguf

    class Reader(gguf.GGUFReader):
        """``GGUFReader`` slicing a plain ndarray view of its memmap: 3x faster to open.

        (Every small read of a ``np.memmap`` pays for its subclass bookkeeping.)
        """

        def _get(self, *args, **kwargs):
            if type(self.data) is np.memmap:
                self.data = self.data.view(np.ndarray)  # keeps the mapping alive as its base
            return super()._get(*args, **kwargs)

    return Reader


def _open(path: Path):
    """A ``gguf.GGUFReader`` on ``path``, with every failure turned into one clear line."""
    if not path.exists():
        raise InfLLMLiteError(f"{path} does not exist")
    if not path.is_file():
        raise InfLLMLiteError(f"{path} is not a file: expected a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise InfLLMLiteError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = _reader_class()(path)
    except Exception as e:  # numpy/gguf errors on a damaged header: one line instead
        raise InfLLMLiteError(
            f"{path} is a truncated or corrupt GGUF file ({type(e).__name__}: {e}): download it again"
        ) from e
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise InfLLMLiteError(
                f"{path} is truncated: tensor {t.name} needs bytes up to {end}, the file has {size}: "
                "download it again"
            )
    return reader


def _metadata(reader, path: Path) -> dict:
    """All key/value metadata as Python values (strings, numbers, lists)."""
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception as e:
            raise InfLLMLiteError(f"{path} has corrupt metadata at key {key!r} ({e}): download it again") from e
    return meta


def _require(meta: dict, key: str, path: Path):
    if key not in meta:
        raise InfLLMLiteError(f"{path} lacks the metadata key {key!r}: not a complete GGUF model file")
    return meta[key]


def _hf_name(name: str) -> str | None:
    """The HF name of a GGUF tensor, or None if it has none here."""
    if m := _LAYER_RE.fullmatch(name):
        layer, part, kind = m.groups()
        if part in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
        return None
    if (m := _GLOBAL_RE.fullmatch(name)) and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``LlamaModel.permute`` (interleaved RoPE -> HF rotate-half rows)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_scaling(factors: np.ndarray, head_dim: int, theta: float, meta: dict, arch: str, path: Path) -> dict:
    """Recover HF's ``rope_type: llama3`` parameters from llama.cpp's ``rope_freqs`` tensor.

    llama.cpp stores the per-frequency divisors that ``convert_hf_to_gguf.py`` computed from
    (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings). The factor
    is their maximum; the other three are searched among the values Llama 3.x uses.
    """
    factor = float(factors.max())
    base = ModelArgs(head_dim=head_dim, rope_theta=theta)
    plain = rope_inv_freq(base).double().numpy()
    originals = [meta.get(f"{arch}.rope.scaling.original_context_length"), 8192, 4096, 2048]
    for old in [int(o) for o in originals if o]:
        for low, high in [(1.0, 4.0), (1.0, 2.0), (2.0, 8.0)]:
            scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                       "high_freq_factor": high, "original_max_position_embeddings": old}
            base.rope_scaling = scaling
            expect = plain / rope_inv_freq(base).double().numpy()  # the divisor of each frequency
            if np.allclose(np.asarray(expect, dtype=np.float32), factors, rtol=1e-5, atol=1e-6):
                return scaling
    raise InfLLMLiteError(f"{path}: its rope_freqs tensor matches no Llama 3 RoPE scaling: not supported")


def _config(meta: dict, arch: str, names: set[str], path: Path) -> dict:
    """An HF config.json dict from the GGUF metadata."""
    p = arch + "."
    hidden = int(_require(meta, p + "embedding_length", path))
    n_heads = int(_require(meta, p + "attention.head_count", path))
    n_kv = meta.get(p + "attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):
        raise InfLLMLiteError(f"{path} has a per-layer number of KV heads: not supported")
    head_dim = int(meta.get(p + "attention.key_length") or meta.get(p + "rope.dimension_count") or hidden // n_heads)
    tokens = meta.get("tokenizer.ggml.tokens") or []
    hf_arch, model_type = ARCHITECTURES[arch]
    config = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(_require(meta, p + "feed_forward_length", path)),
        "num_hidden_layers": int(_require(meta, p + "block_count", path)),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(_require(meta, p + "attention.layer_norm_rms_epsilon", path)),
        "rope_theta": float(meta.get(p + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_require(meta, p + "context_length", path)),
        "vocab_size": int(meta.get(p + "vocab_size") or len(tokens)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if "tokenizer.ggml.padding_token_id" in meta:
        config["pad_token_id"] = meta["tokenizer.ggml.padding_token_id"]
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
        config["mlp_bias"] = False
    scaling = meta.get(p + "rope.scaling.type")
    if scaling and scaling != "none":
        config["rope_scaling"] = {"rope_type": scaling, "factor": float(meta.get(p + "rope.scaling.factor", 1.0))}
        if orig := meta.get(p + "rope.scaling.original_context_length"):
            config["rope_scaling"]["original_max_position_embeddings"] = int(orig)
    return config


def _keeps_packed(name: str | None) -> bool:
    return name is not None and name.endswith(".weight") and (name.endswith("_proj.weight") or name in (
        "lm_head.weight", "model.embed_tokens.weight"))


def _check_packable(reader, path: Path) -> None:
    """Refuse, before reading any tensor, a quantization type this loader does not pack."""
    for t in reader.tensors:
        kind = t.tensor_type.name
        if _keeps_packed(_hf_name(t.name)) and kind not in PACKED_TYPES + _FLOAT_TYPES:
            raise InfLLMLiteError(
                f"{path}: tensor {t.name} is {kind}, which quantize='gguf' does not keep packed "
                f"(packed: {', '.join(PACKED_TYPES)}); load it with quantize=None, 'int8' or 'int4'")


def _tensors(reader, arch: str, config: dict, meta: dict, path: Path, progress: bool,
             packs: dict | None = None) -> dict[str, torch.Tensor]:
    """Dequantize every tensor to float32 under its HF name, Q/K permutation undone
    (``packs``: a dict that receives the packed weights instead, under their HF names)."""
    from gguf.quants import dequantize
    from tqdm.auto import tqdm

    tensors = {}
    for t in tqdm(reader.tensors, desc=f"Reading {path.name}", unit="tensor", disable=not progress):
        if t.name == "rope_freqs.weight":  # llama 3 RoPE scaling, recovered into the config
            factors = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            config["rope_scaling"] = _llama3_rope_scaling(
                factors, config["head_dim"], config["rope_theta"], meta, arch, path
            )
            continue
        name = _hf_name(t.name)
        if name is None:
            raise InfLLMLiteError(f"{path} has a tensor {t.name!r} this loader does not know: unsupported variant")
        if packs is not None and _keeps_packed(name) and t.tensor_type.name in PACKED_TYPES:
            rows = t.data
            if arch == "llama" and ".attn_q." in t.name:  # whole rows of blocks: permuted as they are
                rows = _unpermute(rows, config["num_attention_heads"])
            elif arch == "llama" and ".attn_k." in t.name:
                rows = _unpermute(rows, config["num_key_value_heads"])
            shape = (int(t.shape[1]), int(t.shape[0]))  # GGUF lists (in, out)
            try:
                packs[name] = gguf_pack(rows, t.tensor_type.name, shape)
            except InfLLMLiteError:
                raise
            except Exception as e:
                raise InfLLMLiteError(f"{path}: cannot read tensor {t.name} ({type(e).__name__}: {e})") from e
            continue
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            if arch == "llama" and ".attn_q." in t.name:
                w = _unpermute(w, config["num_attention_heads"])
            elif arch == "llama" and ".attn_k." in t.name:
                w = _unpermute(w, config["num_key_value_heads"])
            w = np.array(w, dtype=np.float32, order="C", copy=True)  # own, writable memory
        except InfLLMLiteError:
            raise
        except Exception as e:
            raise InfLLMLiteError(f"{path}: cannot read tensor {t.name} ({type(e).__name__}: {e})") from e
        if not np.isfinite(w).all():
            raise InfLLMLiteError(f"{path}: tensor {t.name} holds NaN/inf values: the file is corrupt")
        tensors[name] = torch.from_numpy(w)
    return tensors


def _check_complete(tensors: dict, config: dict, path: Path) -> None:
    """Every tensor the config implies is there (``tensors`` may map names to packs)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config["tie_word_embeddings"]:
        names.append("lm_head.weight")
    for i in range(config["num_hidden_layers"]):
        names += [f"model.layers.{i}.{part}.weight" for part in _LAYER_NAMES.values()]
        if config["model_type"] == "qwen2":
            names += [f"model.layers.{i}.self_attn.{x}_proj.bias" for x in "qkv"]
    for name in names:
        if name not in tensors:
            raise InfLLMLiteError(f"{path} lacks the tensor for {name}: not a complete model file")
    embedding = tensors["model.embed_tokens.weight"]
    rows = embedding.out_features if isinstance(embedding, QuantizedLinear) else embedding.shape[0]
    if rows != config["vocab_size"]:
        raise InfLLMLiteError(f"{path}: vocab_size {config['vocab_size']} but the embedding has {rows} rows")


def read_gguf(path: str | os.PathLike, progress: bool = False, packed: bool = False) -> GGUFCheckpoint:
    """Read a llama/qwen2 GGUF file into config, float32 HF tensors and tokenizer
    (``packed``: its Q8_0/Q4_0/Q4_1/Q4_K/Q6_K weights kept packed, in ``packs``)."""
    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader, path)
    arch = _require(meta, "general.architecture", path)
    if arch not in ARCHITECTURES:
        raise InfLLMLiteError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    names = {t.name for t in reader.tensors}
    config = _config(meta, arch, names, path)
    if packed:
        _check_packable(reader, path)
    tokenizer_json, tokenizer_config = build_tokenizer(meta, path)
    packs = {} if packed else None
    tensors = _tensors(reader, arch, config, meta, path, progress, packs)
    _check_complete({**tensors, **(packs or {})}, config, path)
    return GGUFCheckpoint(config, tensors, tokenizer_json, tokenizer_config, packs)


# ---------------------------------------------------------------------------- conversion


def write_folder(ckpt: GGUFCheckpoint, folder: Path) -> None:
    """Write a checkpoint's files into an existing empty ``folder``, all with the
    permissions of an ordinary new file (safetensors alone would make its file 0600)."""
    from safetensors.torch import save_file

    write_metadata_files(ckpt, folder)
    weights = folder / "model.safetensors"
    save_file(ckpt.tensors, str(weights), metadata={"format": "pt"})
    os.chmod(weights, (folder / "config.json").stat().st_mode & 0o777)  # 0666 less the umask


def write_metadata_files(ckpt: GGUFCheckpoint, folder: Path) -> None:
    """Write everything but the weights: config, generation config, tokenizer files."""
    (folder / "config.json").write_text(json.dumps(ckpt.config, indent=2) + "\n")
    generation = {k: ckpt.config[k] for k in ("bos_token_id", "eos_token_id") if ckpt.config.get(k) is not None}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (folder / "tokenizer.json").write_text(ckpt.tokenizer_json, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(ckpt.tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def convert_gguf(
    path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True, overwrite: bool = False
) -> Path:
    """Convert a GGUF file into an HF-style folder ``out_dir`` (float32 safetensors).

    The folder is written beside ``out_dir`` under a temporary name and renamed into place,
    so an interrupted conversion never leaves a half-written folder. If ``out_dir`` already
    exists and is not empty: ``FileExistsError`` (wrapped as ``InfLLMLiteError``) unless
    ``overwrite``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InfLLMLiteError(f"{out_dir} already exists: remove it or choose another output folder")
    tmp = _temporary_folder(out_dir)  # before the dequantization: an unwritable place fails at once
    try:
        ckpt = read_gguf(path, progress=progress)
        write_folder(ckpt, tmp)
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, FileExistsError):
            raise InfLLMLiteError(f"{out_dir} already exists: remove it or choose another output folder") from e
        if isinstance(e, OSError):
            raise InfLLMLiteError(f"cannot write the converted model to {out_dir}: {e}") from e
        raise
    return out_dir


def _temporary_folder(out_dir: Path) -> Path:
    """A new empty folder beside ``out_dir`` (its parents created), renamed into place later."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except FileExistsError as e:  # mkdir(exist_ok=True) on a file
        raise InfLLMLiteError(f"cannot write into {out_dir.parent}: it is a file, not a folder") from e
    except OSError as e:
        raise InfLLMLiteError(f"cannot write into {out_dir.parent}: {e.strerror or e}") from e
    return tmp


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out_dir`` atomically; FileExistsError if a non-empty one is there."""
    if overwrite and out_dir.exists():
        trash = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, out_dir)  # replaces an empty directory; fails on a non-empty one
    except OSError as e:
        if out_dir.is_dir() and any(out_dir.iterdir()):
            raise FileExistsError(str(out_dir)) from e
        raise
