"""Process-group setup for ``torchrun`` (or any ``env://`` launch): the backend chosen
from the device (NCCL for CUDA, gloo for the CPU), each rank's device, and collectives
with a timeout that become one clear :class:`InfLLMLiteError` when a peer dies or hangs.

    group = init_distributed()          # reads RANK, WORLD_SIZE, MASTER_ADDR, ... (torchrun)
    model, tokenizer = load_tp_model(None, group=group)

A dead rank: gloo raises in the survivors as soon as the connection drops, or after the
group's timeout when a peer hangs (``INFLLM_LITE_DIST_TIMEOUT`` seconds, default 300);
:func:`all_reduce_sum` turns either into an error naming the rank and the timeout. On
NCCL the same timeout arms PyTorch's watchdog, which aborts the process with its message.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import InfLLMLiteError

#: Seconds a collective may wait for the other ranks before the rank gives up.
DEFAULT_TIMEOUT_S = 300.0


def env_seconds(name: str, default: float) -> float:
    """The positive number of seconds in the environment variable ``name`` (``default``
    when it is not set)."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise InfLLMLiteError(f"{name} must be a number of seconds, got {value!r}") from None
    if seconds <= 0:
        raise InfLLMLiteError(f"{name} must be positive, got {value!r}")
    return seconds


def timeout_seconds() -> float:
    return env_seconds("INFLLM_LITE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)


def launched_distributed() -> bool:
    """Whether this process was started by torchrun (or another env:// launcher) with
    more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend_for(device: torch.device | str) -> str:
    """NCCL for CUDA devices, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def rank_device(device: str | torch.device | None = None) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when CUDA is there (or asked for
    without an index), else the CPU; an explicit ``cuda:i`` or ``cpu`` is kept."""
    if device is not None:
        device = torch.device(device)
        if device.type != "cuda" or device.index is not None:
            return device
    elif not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device: str | torch.device | None = None,
                     timeout_s: float | None = None, backend: str | None = None) -> dist.ProcessGroup:
    """The default process group, initialised from the environment if it is not yet
    (backend from this rank's device, :func:`rank_device`, unless given), with collectives
    timing out after ``timeout_s`` (default :func:`timeout_seconds`)."""
    if dist.is_initialized():
        return dist.group.WORLD
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise InfLLMLiteError(f"tensor parallelism needs a distributed launch: {name} is not set "
                                  "(run under torchrun --nproc-per-node N)")
    device = rank_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seconds = timeout_seconds() if timeout_s is None else timeout_s
    try:
        backend = backend or backend_for(device)
        dist.init_process_group(backend, timeout=timedelta(seconds=seconds),
                                **({"device_id": device} if backend == "nccl" else {}))
    except (RuntimeError, ValueError) as e:
        raise InfLLMLiteError(f"could not join the process group ({e})") from None
    return dist.group.WORLD


def describe_failure(group, error: Exception, what: str,
                     variable: str = "INFLLM_LITE_DIST_TIMEOUT") -> InfLLMLiteError:
    """The error of a failed collective; ``variable``: the group's timeout setting."""
    rank = dist.get_rank(group)
    return InfLLMLiteError(
        f"rank {rank}: {what} failed: another rank died or did not answer within the collective "
        f"timeout ({variable}; {str(error).splitlines()[0] if str(error) else type(error).__name__})")


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum ``x`` over the ranks of ``group`` in place and return it; a dead or hung peer
    raises :class:`InfLLMLiteError` instead of hanging."""
    try:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    except (RuntimeError, dist.DistError) as e:
        raise describe_failure(group, e, "an all_reduce") from None
    return x


def barrier(group) -> None:
    try:
        dist.barrier(group=group)
    except (RuntimeError, dist.DistError) as e:
        raise describe_failure(group, e, "a barrier") from None


def broadcast_object(obj, group, src: int = 0, variable: str = "INFLLM_LITE_DIST_TIMEOUT"):
    """Rank ``src``'s ``obj`` (any picklable value) on every rank of ``group``; ``src`` is
    a global rank, the other ranks pass anything. A dead or hung peer raises
    :class:`InfLLMLiteError` (naming ``variable``, the group's timeout setting)."""
    box = [obj]
    try:
        dist.broadcast_object_list(box, src=src, group=group)
    except (RuntimeError, dist.DistError) as e:
        raise describe_failure(group, e, "a broadcast", variable) from None
    return box[0]


def all_gather_object(obj, group) -> list:
    """Every rank's ``obj``, in rank order, on every rank of ``group``."""
    out = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(out, obj, group=group)
    except (RuntimeError, dist.DistError) as e:
        raise describe_failure(group, e, "an all_gather") from None
    return out
