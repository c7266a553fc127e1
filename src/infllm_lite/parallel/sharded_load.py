"""Loading a rank's shard of a checkpoint.

* A Hugging Face folder (and the embedded model, which is one): each tensor is read
  through safetensors' ``get_slice``, so a rank reads only its rows or columns of the
  split tensors (plus the replicated embedding, norms and head); it never holds the
  whole checkpoint.
* A GGUF file: its quantized blocks run along rows of the stored (permuted) tensors, so
  the file is dequantized whole, as a single process does, and each rank then keeps its
  slices and drops the rest: the whole float checkpoint exists, briefly, in every rank.
  Convert it once (``infllm-lite convert``) to load shard by shard.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelArgs
from ..weights.hf_folder import read_hf_state_dict
from .plan import split_of


def shard_tensor(name: str, tensor: torch.Tensor, args: ModelArgs, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s part of the (whole) checkpoint tensor ``name`` (a copy when split)."""
    how = split_of(name, args, rank, world_size)
    if how is None:
        return tensor
    kind, axis, a, b = how
    if kind == "rank0":
        return tensor if rank == 0 else torch.zeros_like(tensor)
    return tensor.narrow(axis, a, b - a).clone()


def read_hf_shard(folder: Path, args: ModelArgs, rank: int, world_size: int,
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s tensors of the folder's safetensors, each read as a slice."""

    def take(name, opened):
        how = split_of(name, args, rank, world_size)
        if how is None:
            return opened.get_tensor(name)
        kind, axis, a, b = how
        if kind == "rank0":
            t = opened.get_tensor(name)
            return t if rank == 0 else torch.zeros_like(t)
        part = opened.get_slice(name)
        return part[a:b] if axis == 0 else part[:, a:b]

    return read_hf_state_dict(folder, dtype, take=take)


def shard_state_dict(state_dict: dict[str, torch.Tensor], args: ModelArgs, rank: int,
                     world_size: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s tensors of a whole in-memory checkpoint (GGUF); the caller drops the
    whole one."""
    return {name: shard_tensor(name, t, args, rank, world_size) for name, t in state_dict.items()}
