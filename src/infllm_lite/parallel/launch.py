"""The commands under ``torchrun``: ``infllm-lite generate --tensor-parallel`` joins the
process group, loads this rank's shard, agrees on one sampling seed, and leaves the
printing to rank 0 (the other ranks' stdout goes to ``os.devnull``, and of their stderr
only errors and tracebacks pass, prefixed ``[rank N]``)."""

from __future__ import annotations

import atexit
import os
import sys

import torch
import torch.distributed as dist

from ..errors import InfLLMLiteError
from .group import init_distributed, rank_device


def check_tensor_parallel_args(args, *, batch: bool) -> None:
    """What ``generate --tensor-parallel`` does not do (yet), refused before any work.
    ``batch``: several prompts (the engine), which runs."""
    if batch and getattr(args, "output", None) is not None:  # several prompts: the engine steps
        # identically on every rank (its schedule depends on no clock), but one file, one writer
        raise InfLLMLiteError("--output does not apply with --tensor-parallel (yet): rank 0 prints the "
                              "answers under their headers")
    if getattr(args, "compile", False):
        raise InfLLMLiteError("--compile does not apply with --tensor-parallel")


def shared_seed(group, seed: int | None, device) -> int | None:
    """A seed every rank samples with: the given one, or rank 0's random pick (ranks that
    sampled differently would feed their collectives different tokens and deadlock).
    ``device``: where the group's collectives run (CUDA for NCCL)."""
    if seed is not None:
        return seed
    pick = torch.randint(0, 2**31 - 1, (1,), dtype=torch.long).to(device)
    from .group import all_reduce_sum
    if dist.get_rank(group) != 0:
        pick.zero_()
    return int(all_reduce_sum(pick, group).item())


class _ErrorsOnly:
    """A rank's stderr that stays silent until an ``error: ...`` line or a traceback."""

    def __init__(self, stream, rank: int):
        self.stream, self.rank, self.passing = stream, rank, False

    def write(self, text: str) -> int:
        if not self.passing and text.startswith(("error:", "Traceback")):
            self.passing = True  # the process is ending: everything from here on
            self.stream.write(f"[rank {self.rank}] ")
        if self.passing:
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def _finish(group) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def load_tensor_parallel(args, dtype):
    """The (model, tokenizer) of this rank for a command's parsed ``args`` (``--model``,
    ``--device``), with rank 0's stdout only; ``args.seed`` made common."""
    from .model import load_tp_model
    device = rank_device(args.device)
    group = init_distributed(device)
    atexit.register(_finish, group)
    if dist.get_rank(group) != 0:
        sys.stdout = open(os.devnull, "w")
        sys.stderr = _ErrorsOnly(sys.stderr, dist.get_rank(group))
    model, tokenizer = load_tp_model(args.model, group=group, dtype=dtype, device=device)
    if hasattr(args, "seed") and getattr(args, "temperature", 0.0) > 0:
        args.seed = shared_seed(group, args.seed, device)
    return model, tokenizer
