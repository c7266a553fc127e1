"""``load_model``: from a source (nothing, a folder, a hub id, a GGUF file) to
``(model, tokenizer)``, its linear layers quantized on request (``quantize``).

``quantize="int8"`` / ``"int4"`` quantize the float weights after loading (the LM head
too; a tied embedding then reads the head's pack). ``quantize="gguf"`` keeps a GGUF
file's Q8_0/Q4_0/Q4_1/Q4_K/Q6_K weights packed as they are in the file (no float32 copy is ever
made of them); with no source it reads the embedded model's GGUF. It is not the default
for GGUF sources: the float32 path stays the parity reference, and a converted folder
loads faster than the GGUF is read."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .config import ModelArgs
from .errors import InfLLMLiteError
from .models.build import build_model
from .models.quantized import check_divides, check_quantize, quantize_model
from .models.transformer import Transformer
from .tokenizer import Tokenizer
from .weights.embedded import embedded_gguf_path, embedded_model_dir
from .weights.gguf import read_gguf, write_metadata_files
from .weights.hf_folder import read_hf_config, read_hf_state_dict
from .weights.hub import resolve_source


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on the CPU (bf16 matmuls are hundreds of times slower there), bf16 on GPUs."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(source: str | os.PathLike | None = None, *, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None,
               progress: bool = True, quantize: str | None = None,
               group_size: int | None = None) -> tuple[Transformer, Tokenizer]:
    """Load a checkpoint and its tokenizer.

    ``source``: None for the embedded SmolLM2-135M-Instruct; a Hugging Face model folder;
    a hub id (``owner/name[@revision]``); or a ``.gguf`` file (converted in memory).
    ``quantize``: None (float weights), ``"int8"`` (per-channel), ``"int4"`` (groups of
    ``group_size``: 32, 64 or 128; 32 by default) or ``"gguf"`` (a GGUF's blocks kept
    packed); checked before any work.
    """
    quantize, group_size = check_quantize(quantize, group_size)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if quantize == "gguf":
        path = embedded_gguf_path() if source is None else resolve_source(source)
        if not path.is_file():
            raise InfLLMLiteError(f"quantize='gguf' needs a .gguf file; {source} is a model folder")
        return load_gguf(path, dtype=dtype, device=device, progress=progress, packed=True)
    if source is None:
        return load_hf_folder(embedded_model_dir(progress=progress), dtype=dtype, device=device,
                              quantize=quantize, group_size=group_size)
    path = resolve_source(source)
    if path.is_file():  # resolve_source returns files only for .gguf
        return load_gguf(path, dtype=dtype, device=device, progress=progress, quantize=quantize,
                         group_size=group_size)
    return load_hf_folder(path, dtype=dtype, device=device, quantize=quantize, group_size=group_size)


def load_hf_folder(folder: Path, *, dtype: torch.dtype, device: torch.device, quantize: str | None = None,
                   group_size: int | None = None) -> tuple[Transformer, Tokenizer]:
    args = ModelArgs.from_hf_config(read_hf_config(folder))
    if quantize == "int4":
        check_divides(args, group_size)
    tokenizer = Tokenizer.from_dir(folder)
    model = _build(args, read_hf_state_dict(folder), tokenizer, folder, dtype, device)
    return _quantized(model, quantize, group_size), tokenizer


def load_gguf(path: Path, *, dtype: torch.dtype, device: torch.device, progress: bool = True,
              quantize: str | None = None, group_size: int | None = None,
              packed: bool = False) -> tuple[Transformer, Tokenizer]:
    """Dequantize in memory (``packed``: keep Q8_0/Q4_0/Q4_1/Q4_K/Q6_K weights packed instead);
    only the small tokenizer files pass through a temporary folder."""
    ckpt = read_gguf(path, progress=progress, packed=packed)
    args = ModelArgs.from_hf_config(ckpt.config)
    if quantize == "int4":
        check_divides(args, group_size)
    with tempfile.TemporaryDirectory(prefix="infllm_lite_gguf_") as tmp:
        write_metadata_files(ckpt, Path(tmp))
        tokenizer = Tokenizer.from_dir(tmp)
    if not packed:
        return _quantized(_build(args, ckpt.tensors, tokenizer, path, dtype, device), quantize, group_size), tokenizer
    # The packed weights' float parameters are never allocated: a broadcast scalar stands
    # in for each until its Linear is replaced by the pack's layer.
    tensors = dict(ckpt.tensors)
    packs = {}
    for name, layer in ckpt.packs.items():
        tensors[name] = torch.zeros((), dtype=dtype, device=device).expand(layer.out_features, layer.in_features)
        module = name[len("model."):] if name.startswith("model.") else name
        packs[module.removesuffix(".weight")] = layer.to(device)
    if args.tie_word_embeddings and "embed_tokens" in packs:
        packs["lm_head"] = packs["embed_tokens"]
    model = _build(args, tensors, tokenizer, path, dtype, device)
    return quantize_model(model, "gguf", packs=packs, head="lm_head" in packs, only_packs=True), tokenizer


def _quantized(model: Transformer, quantize: str | None, group_size: int | None) -> Transformer:
    return model if quantize is None else quantize_model(model, quantize, group_size)


def _build(args: ModelArgs, state_dict: dict[str, torch.Tensor], tokenizer: Tokenizer, where: Path,
           dtype: torch.dtype, device: torch.device) -> Transformer:
    if tokenizer.vocab_size > args.vocab_size:
        raise InfLLMLiteError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"vocabulary is {args.vocab_size}")
    return build_model(args, state_dict, dtype=dtype, device=device)
