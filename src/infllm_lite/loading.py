"""``load_model``: from a source (nothing, a folder, a hub id, a GGUF file) to
``(model, tokenizer)``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .config import ModelArgs
from .errors import InfLLMLiteError
from .models.build import build_model
from .models.transformer import Transformer
from .tokenizer import Tokenizer
from .weights.embedded import embedded_model_dir
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
               progress: bool = True) -> tuple[Transformer, Tokenizer]:
    """Load a checkpoint and its tokenizer.

    ``source``: None for the embedded SmolLM2-135M-Instruct; a Hugging Face model folder;
    a hub id (``owner/name[@revision]``); or a ``.gguf`` file (converted in memory).
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if source is None:
        return load_hf_folder(embedded_model_dir(progress=progress), dtype=dtype, device=device)
    path = resolve_source(source)
    if path.is_file():  # resolve_source returns files only for .gguf
        return load_gguf(path, dtype=dtype, device=device, progress=progress)
    return load_hf_folder(path, dtype=dtype, device=device)


def load_hf_folder(folder: Path, *, dtype: torch.dtype, device: torch.device) -> tuple[Transformer, Tokenizer]:
    args = ModelArgs.from_hf_config(read_hf_config(folder))
    tokenizer = Tokenizer.from_dir(folder)
    return _build(args, read_hf_state_dict(folder), tokenizer, folder, dtype, device), tokenizer


def load_gguf(path: Path, *, dtype: torch.dtype, device: torch.device,
              progress: bool = True) -> tuple[Transformer, Tokenizer]:
    """Dequantize in memory; only the small tokenizer files pass through a temporary folder."""
    ckpt = read_gguf(path, progress=progress)
    args = ModelArgs.from_hf_config(ckpt.config)
    with tempfile.TemporaryDirectory(prefix="infllm_lite_gguf_") as tmp:
        write_metadata_files(ckpt, Path(tmp))
        tokenizer = Tokenizer.from_dir(tmp)
    return _build(args, ckpt.tensors, tokenizer, path, dtype, device), tokenizer


def _build(args: ModelArgs, state_dict: dict[str, torch.Tensor], tokenizer: Tokenizer, where: Path,
           dtype: torch.dtype, device: torch.device) -> Transformer:
    if tokenizer.vocab_size > args.vocab_size:
        raise InfLLMLiteError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"vocabulary is {args.vocab_size}")
    return build_model(args, state_dict, dtype=dtype, device=device)
