"""Read a Hugging Face model folder: config.json and safetensors weights (plain or sharded)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import InfLLMLiteError

INDEX = "model.safetensors.index.json"


def _check_folder(folder: Path) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise InfLLMLiteError(f"{folder} does not exist")
    if not folder.is_dir():
        raise InfLLMLiteError(f"{folder} is not a folder: expected a Hugging Face model folder")
    return folder


def read_hf_config(folder: str | os.PathLike) -> dict:
    """The folder's config.json as a dict."""
    folder = _check_folder(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise InfLLMLiteError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InfLLMLiteError(f"{path} is not valid JSON ({e}): fix or re-download it") from e
    if not isinstance(config, dict):
        raise InfLLMLiteError(f"{path} does not hold a JSON object: fix or re-download it")
    return config


def _shards(folder: Path) -> list[Path]:
    """The safetensors files holding the folder's weights."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise InfLLMLiteError(f"{index} is not a valid safetensors index ({e}): re-download it") from e
        for name in names:
            if not (folder / name).is_file():
                raise InfLLMLiteError(f"{index} names the shard {name}, which is missing: download it")
        return [folder / name for name in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        hint = " (PyTorch .bin weights are not supported: convert them to safetensors)" if any(
            folder.glob("*.bin")) else ""
        raise InfLLMLiteError(f"{folder} has no *.safetensors weights{hint}")
    return found


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError, ...: one line naming the file
        raise InfLLMLiteError(
            f"{path} is not a readable safetensors file, probably truncated or corrupt ({e}): download it again"
        ) from e


def _read_taking(path: Path, take) -> dict[str, torch.Tensor]:
    """``take(name, opened)`` of every tensor of the file (``opened``: its ``safe_open``
    handle, so that ``take`` may read a slice only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as opened:
            return {name: take(name, opened) for name in opened.keys()}
    except Exception as e:  # SafetensorError, OSError, ...: one line naming the file
        if isinstance(e, InfLLMLiteError):
            raise
        raise InfLLMLiteError(
            f"{path} is not a readable safetensors file, probably truncated or corrupt ({e}): download it again"
        ) from e


def read_hf_state_dict(folder: str | os.PathLike, dtype: torch.dtype | None = None, *,
                       take=None) -> dict[str, torch.Tensor]:
    """All tensors of the folder's safetensors file(s), under their stored (HF) names.

    ``dtype``: cast floating-point tensors to it (integer tensors are left alone).
    ``take(name, opened)``: what to keep of each tensor, read from the file's ``safe_open``
    handle (``opened.get_slice(name)[a:b]`` reads only those rows: tensor parallelism
    loads its shard this way, never the whole checkpoint); default: the whole tensor.
    """
    folder = _check_folder(folder)
    state_dict: dict[str, torch.Tensor] = {}
    for shard in _shards(folder):
        tensors = _load_file(shard) if take is None else _read_taking(shard, take)
        for name, tensor in tensors.items():
            if name in state_dict:
                raise InfLLMLiteError(f"{folder}: tensor {name} is stored twice (again in {shard.name})")
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            state_dict[name] = tensor
    return state_dict
