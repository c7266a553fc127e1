"""The tensor-parallel sharding plan: which checkpoint tensor is split on which axis,
and the per-rank :class:`ShardedArgs` a rank's model (and so its attention memories)
is built from.

Megatron's split, as gpt-fast's ``tp.py`` does it: per layer the q/k/v and gate/up
projections are **column-parallel** (each rank computes its own heads and MLP columns:
weight and bias split on the output axis), o_proj and down_proj **row-parallel** (weight
split on the input axis, the partial outputs summed by one ``all_reduce`` each; a bias is
added once, by rank 0). Rank ``r`` of ``N`` holds query heads ``[r·H/N, (r+1)·H/N)`` and
KV heads ``[r·Hkv/N, (r+1)·Hkv/N)``: with GQA each query head's KV head is on its rank.
Embedding, norms and LM head are replicated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import ModelArgs
from ..errors import InfLLMLiteError

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # output axis split
ROW = ("o_proj", "down_proj")  # input axis split, partial sums all-reduced


@dataclass
class ShardedArgs(ModelArgs):
    """A rank's share of a model: heads and MLP columns divided by ``tp_world_size``.

    The attention memories built from it hold this rank's KV heads only. After
    :func:`~.model.shard_model` its ``score_reduce`` attribute (not a dataclass field: it
    is a callable, never saved) sums InfLLM's block scores over the ranks, which
    :class:`~infllm_lite.attention.infllm.InfLLMState` picks up."""

    tp_rank: int = 0
    tp_world_size: int = 1


def check_divisible(args: ModelArgs, world_size: int) -> None:
    """Refuse a world size the model's heads or MLP columns cannot be split into."""
    if world_size < 1:
        raise InfLLMLiteError(f"tensor parallelism: world size must be positive, got {world_size}")
    for what, n in (("attention heads", args.n_heads), ("key/value heads", args.n_kv_heads),
                    ("MLP columns (intermediate_size)", args.intermediate_size)):
        if n % world_size:
            raise InfLLMLiteError(
                f"tensor parallelism over {world_size} ranks needs the model's {what} ({n}) to be "
                f"divisible by {world_size}; use a world size that divides {n}")


def local_args(args: ModelArgs, rank: int, world_size: int) -> ShardedArgs:
    """Rank ``rank``'s ModelArgs (checked: :func:`check_divisible`)."""
    check_divisible(args, world_size)
    if not 0 <= rank < world_size:
        raise InfLLMLiteError(f"tensor parallelism: rank {rank} is outside a world of {world_size}")
    fields = {k: v for k, v in asdict(args).items() if k not in ("tp_rank", "tp_world_size")}
    fields.update(n_heads=args.n_heads // world_size, n_kv_heads=args.n_kv_heads // world_size,
                  intermediate_size=args.intermediate_size // world_size)
    return ShardedArgs(**fields, tp_rank=rank, tp_world_size=world_size)


def split_of(name: str, args: ModelArgs, rank: int, world_size: int) -> tuple[str, int, int, int] | None:
    """How rank ``rank`` takes the checkpoint tensor ``name`` (HF name): None (whole, a
    replicated tensor), ``("slice", axis, start, stop)``, or ``("rank0", 0, 0, 0)`` for a
    row-parallel bias (rank 0 keeps it, the others hold zeros)."""
    parts = name.split(".")
    if len(parts) < 2 or parts[-1] not in ("weight", "bias"):
        return None
    module, kind = parts[-2], parts[-1]
    if module not in COLUMN and module not in ROW:
        return None
    if module in ("q_proj", "o_proj"):
        size = args.n_heads * args.head_dim
    elif module in ("k_proj", "v_proj"):
        size = args.n_kv_heads * args.head_dim
    else:
        size = args.intermediate_size
    share = size // world_size
    if module in COLUMN:
        return ("slice", 0, rank * share, (rank + 1) * share)
    if kind == "bias":
        return ("rank0", 0, 0, 0)
    return ("slice", 1, rank * share, (rank + 1) * share)
