"""LM-Infinite's Λ-shaped attention (Han et al., 2023; Glaciohound/LM-Infinite): a global
branch of the first ``n_init`` tokens and a local branch of the last ``n_local``, with the
distance between a query and a global token capped at ``n_local``.

The rule, for a query at absolute position ``i`` (the repository's ``lambda_attention``
with ``global_branch = n_init``, ``local_branch = limit_distance = n_local``):

* visible keys: the global tokens ``j < n_init`` (``j <= i``) and the local ones
  ``j >= n_init`` with ``0 <= i - j < n_local``; everything else is dropped for good;
* a local key is at its true distance ``i - j`` (query at ``i``, key at ``j``); a global
  token at distance ``min(i - j, n_local)``: below the cap as a local key, from there the
  query rotated at ``n_local`` against the un-rotated key (the repository's "stationary"
  query and key);
* one softmax (scale ``1/√d``) over both branches.

It differs from StreamingLLM (:mod:`.streaming`) only in the global tokens' distance
(StreamingLLM puts the query at ``min(i, n_init + n_local - 1)`` and a sink at ``j``), so
it is StreamingLLM's memory (sinks and window ring, the same plans, slices and snapshots)
with that distance: ``StreamingState.distance_cap``.
"""

from __future__ import annotations

import torch

from ..config import ModelArgs
from ..memory_config import MemoryConfig
from .streaming import StreamingState


class LMInfiniteState(StreamingState):
    """Global and local branch of every layer for one generation (see the module)."""

    def __init__(self, args: ModelArgs, memory: MemoryConfig, *, batch_size: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__(args, memory, batch_size=batch_size, dtype=dtype, device=device)
        self.distance_cap = memory.n_local
