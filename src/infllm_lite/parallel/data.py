"""Data-parallel evaluation under ``torchrun``: every rank a whole model on its own
device (``cuda:LOCAL_RANK``, else the CPU), the samples split by rank
(:func:`infllm_lite.eval.runner.run_eval`'s ``shard``). The ranks talk only through a
gloo group (CPU barriers, on GPU machines too): once when the settings are checked and
once when all have answered. That last wait lasts as long as the slowest rank's share,
so its timeout is ``INFLLM_LITE_EVAL_WAIT`` seconds (default a day) rather than the
collective timeout; a rank that dies closes its connection and the others stop at once
with an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from .group import barrier, env_seconds, init_distributed, rank_device

DEFAULT_WAIT_S = 24 * 3600.0


@dataclass
class EvalShard:
    """This rank's share of a data-parallel evaluation."""

    rank: int
    world_size: int
    group: object  # settings barrier (the collective timeout)
    wait_group: object  # the final wait (INFLLM_LITE_EVAL_WAIT)

    @property
    def file_name(self) -> str:
        return f"predictions.rank{self.rank}-of-{self.world_size}.jsonl"

    def barrier(self) -> None:
        barrier(self.group)

    def wait_for_all(self) -> None:
        barrier(self.wait_group)


def join_eval(device=None) -> tuple[EvalShard, str]:
    """Join the launch's process group for a data-parallel evaluation: (the shard, this
    rank's device)."""
    wait = env_seconds("INFLLM_LITE_EVAL_WAIT", DEFAULT_WAIT_S)
    device = rank_device(device)
    group = init_distributed(device, backend="gloo")
    wait_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait))
    return EvalShard(dist.get_rank(group), dist.get_world_size(group), group, wait_group), str(device)
