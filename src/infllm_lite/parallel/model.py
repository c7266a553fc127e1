"""A tensor-parallel :class:`~infllm_lite.models.transformer.Transformer`: an explicit
split plus ``all_reduce``, as pytorch-labs/gpt-fast's ``tp.py``.

Why not DTensor's ``parallelize_module``: the model hands q/k/v to attention memories
(full, streaming, InfLLM with its slot arrays, block pool, disk tier, Triton and flex
kernels, the engine's ragged batches) that index, copy and page plain tensors; DTensors
would have to flow through every one of them, and several (flex, Triton, the pool's
host copies) do not take DTensors. With an explicit split each rank's model is an
ordinary ``Transformer`` built from its :class:`~.plan.ShardedArgs` (its share of the
heads and MLP columns), so every memory works unchanged on its own heads, and the only
communication is visible: one ``all_reduce`` after ``o_proj`` and one after
``down_proj`` per layer (forward hooks, as gpt-fast registers them), plus, for InfLLM,
one of the (n_blocks,) block scores per execution chunk and layer
(``args.score_reduce``). Works the same on gloo (CPU) and NCCL (CUDA).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import ModelArgs
from ..errors import InfLLMLiteError
from ..models.build import build_model
from ..models.transformer import Transformer
from .group import all_reduce_sum, init_distributed, rank_device
from .plan import ROW, local_args
from .sharded_load import read_hf_shard, shard_state_dict


@dataclass
class TensorParallel:
    """What a sharded model knows of its parallelism (``model.tp``)."""

    group: object  # the torch.distributed ProcessGroup
    rank: int
    world_size: int
    full_args: ModelArgs  # the whole model's config


def _reduce_output(group):
    def hook(module, inputs, output):
        return all_reduce_sum(output, group)
    return hook


def agree_on_cpu_kernel(group) -> str:
    """Every rank's CPU ``Linear`` kernel set to rank 0's (a per-process timing probe
    could pick oneDNN on one rank and BLAS on another: the replicated norm and LM head
    would then differ in their last bits between ranks, and so could a sampled token)."""
    from ..models.linear import CPU_LINEAR_KERNELS, cpu_linear_kernel, set_cpu_linear_kernel
    choice = torch.tensor([CPU_LINEAR_KERNELS.index(cpu_linear_kernel()) if dist.get_rank(group) == 0 else 0])
    kernel = CPU_LINEAR_KERNELS[int(all_reduce_sum(choice, group).item())]
    set_cpu_linear_kernel(kernel)
    return kernel


def shard_model(model: Transformer, full_args: ModelArgs, group) -> Transformer:
    """Make ``model`` (built from a rank's :class:`~.plan.ShardedArgs`) tensor-parallel:
    the row-parallel projections' outputs summed over ``group``, InfLLM's block scores
    too (``model.args.score_reduce``), and ``model.tp`` set. On the CPU the ranks agree
    on one ``Linear`` kernel first (:func:`agree_on_cpu_kernel`), so the replicated parts
    compute the same bits on every rank."""
    if next(model.parameters()).device.type == "cpu":
        agree_on_cpu_kernel(group)
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in ROW:
                if hasattr(parent, name):
                    getattr(parent, name).register_forward_hook(_reduce_output(group))
    model.args.score_reduce = lambda scores: all_reduce_sum(scores, group)
    model.tp = TensorParallel(group, dist.get_rank(group), dist.get_world_size(group), full_args)
    return model


def build_tp_model(full_args: ModelArgs, shard: dict[str, torch.Tensor], group, *,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Transformer:
    """This rank's model from its ``shard`` of the checkpoint (:mod:`.sharded_load`):
    every tensor's name and (sharded) shape checked by ``build_model``."""
    args = local_args(full_args, dist.get_rank(group), dist.get_world_size(group))
    return shard_model(build_model(args, shard, dtype=dtype, device=device), full_args, group)


def load_tp_model(source: str | os.PathLike | None = None, *, group=None, dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None, progress: bool = True):
    """``load_model`` for one rank of a tensor-parallel group: ``(model, tokenizer)``.

    ``group``: a ``torch.distributed`` process group (default: the default group,
    initialised from the environment if needed: :func:`~.group.init_distributed`);
    ``device``: default ``cuda:LOCAL_RANK`` with CUDA, else the CPU. Only rank 0 shows
    progress. See :mod:`.sharded_load` for what each rank reads."""
    from ..loading import default_dtype
    from ..tokenizer import Tokenizer
    from ..weights.embedded import embedded_model_dir
    from ..weights.hf_folder import read_hf_config
    from ..weights.hub import resolve_source

    device = rank_device(device)
    if group is None:
        group = init_distributed(device)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if device.type == "cuda" and backend_name(group) != "nccl":
        raise InfLLMLiteError(f"rank {rank}: the model is on {device} but the process group uses "
                              f"{backend_name(group)}; CUDA tensors need NCCL")
    dtype = dtype or default_dtype(device)
    progress = progress and rank == 0
    path = embedded_model_dir(progress=progress) if source is None else resolve_source(source)
    if path.is_file():  # a GGUF: dequantized whole, then sliced (sharded_load's docstring)
        import tempfile
        from pathlib import Path

        from ..weights.gguf import read_gguf, write_metadata_files
        ckpt = read_gguf(path, progress=progress)
        args = ModelArgs.from_hf_config(ckpt.config)
        local_args(args, rank, world)  # refuse a bad world size before the work
        shard = shard_state_dict(ckpt.tensors, args, rank, world)
        with tempfile.TemporaryDirectory(prefix="infllm_lite_gguf_") as tmp:
            write_metadata_files(ckpt, Path(tmp))
            tokenizer = Tokenizer.from_dir(tmp)
        del ckpt
    else:
        args = ModelArgs.from_hf_config(read_hf_config(path))
        local_args(args, rank, world)
        shard = read_hf_shard(path, args, rank, world)
        tokenizer = Tokenizer.from_dir(path)
    if tokenizer.vocab_size > args.vocab_size:
        raise InfLLMLiteError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                              f"vocabulary is {args.vocab_size}")
    return build_tp_model(args, shard, group, dtype=dtype, device=device), tokenizer


def rank_path(path: str | os.PathLike, model):
    """Where rank R of N saves its snapshot of ``path`` (``name.rankR-of-N.snap``): a
    tensor-parallel model's memory holds its rank's heads only, so each rank saves (and
    loads) its own file. ``path`` itself for a model that is not sharded."""
    from pathlib import Path
    path, tp = Path(path), getattr(model, "tp", None)
    if tp is None:
        return path
    return path.with_name(f"{path.stem}.rank{tp.rank}-of-{tp.world_size}{path.suffix}")


def backend_name(group) -> str:
    return str(dist.get_backend(group)).lower()
