"""Tensor parallelism and sharded evaluation on ``torch.distributed`` (``torchrun``).

* :mod:`.group`: the process group (NCCL on CUDA, gloo on the CPU), collectives with
  timeouts;
* :mod:`.plan`: which tensor splits on which axis, the per-rank :class:`ShardedArgs`;
* :mod:`.sharded_load`: a rank's shard of a checkpoint, read slice by slice;
* :mod:`.model`: the tensor-parallel model (explicit split + ``all_reduce``), ``load_tp_model``;
* :mod:`.launch`: the commands under ``torchrun`` (rank 0 prints, one sampling seed);
* :mod:`.chat`: ``chat --tensor-parallel`` (rank 0 reads, every rank runs each step);
* :mod:`.data`: data-parallel ``eval`` (the samples split by rank).
"""

from .group import all_reduce_sum, backend_for, init_distributed, launched_distributed, rank_device
from .model import TensorParallel, build_tp_model, load_tp_model, rank_path, shard_model
from .plan import ShardedArgs, check_divisible, local_args

__all__ = ["ShardedArgs", "TensorParallel", "all_reduce_sum", "backend_for", "build_tp_model",
           "check_divisible", "init_distributed", "launched_distributed", "load_tp_model", "local_args",
           "rank_device", "rank_path", "shard_model"]
