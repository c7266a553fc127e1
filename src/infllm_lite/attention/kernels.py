"""How InfLLM computes one execution chunk's joint attention: the ``attention_kernel``
option resolved once, at construction, into a kernel object.

A kernel owns its chunk geometry (what every layer shares for one chunk: the query rows,
their rotations and the kernel's own tile or window lists) and its ``attend``. A layer's
chunk calls ``kernel.geometry(...)`` once per chunk (cached by the state over the layers)
and ``kernel.attend(...)`` per layer; nothing re-reads the option's name.

* :class:`WindowKernel`: dense matmuls over each query tile's key window
  (:mod:`.window_joint`), compiled or eager; the CPU's default (about twice compiled flex
  there).
* :class:`FlexKernel`: three FlexAttention calls over block masks (:mod:`.flex_joint`),
  compiled or eager; its representative scores come from the Triton kernel
  (:mod:`infllm_lite.kernels.representative_scores`) or from a swapped flex call.
* :class:`DenseKernel`: every logit materialised (:mod:`.dense_joint`), for debugging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.representative_scores import representative_scores
from ..options import ATTENTION_KERNELS, check_choice
from .dense_joint import joint_attention_dense
from .flex_joint import ChunkMasks, chunk_masks, far_tiles, joint_attention_flex
from .slots import EMPTY, FAR, PAD_QUERY, SlotLayout, compiled_once
from .window_joint import block_keys, joint_attention_window, window_rows, window_sizes, window_slots


@dataclass
class ChunkGeometry:
    """What every layer shares for one execution chunk, whatever the kernel."""

    padded: int  # query rows after padding
    cos: torch.Tensor  # (padded, d) rotation of the query rows (position 0 on padding)
    sin: torch.Tensor
    q_pos: torch.Tensor  # (padded,) query positions, PAD_QUERY on padding rows


@dataclass
class FlexGeometry(ChunkGeometry):
    """The flex (and dense) kernels' chunk: tile masks, and the far call's slot positions
    (B, S) and tiles when no block is selected."""

    masks: ChunkMasks
    far_pos: torch.Tensor
    far_lists: tuple[torch.Tensor, ...]


@dataclass
class WindowGeometry(ChunkGeometry):
    """The window kernel's chunk (:mod:`.window_joint`): each query tile's local window
    slots and positions (n_tiles, W), the far prefix's positions (F,), and how far into
    the prefix each tile reaches."""

    win_idx: torch.Tensor
    win_pos: torch.Tensor
    prefix_pos: torch.Tensor
    reach: tuple[int, ...]


def query_rows(padded: int, s: int, e: int, rope, device: torch.device):
    """Positions (padded,) of a chunk's query rows [s, e) padded with ``PAD_QUERY``, and
    their rotations (padded, d) (padding rows rotated at position 0)."""
    rows = torch.arange(padded, device=device)
    real = rows < e - s
    cos, sin = rope(torch.where(real, s + rows, 0), torch.float32)
    return torch.where(real, s + rows, PAD_QUERY), cos, sin


class InfLLMKernel:
    """One way to compute a chunk's joint attention (the interface)."""

    name: str  # the option value that names it (recorded with eval predictions)
    compiled: bool
    local_path = False  # chunks with only local keys go to :mod:`.local_chunk` instead

    def geometry(self, layout: SlotLayout, s: int, e: int, tail_start: int, rope,
                 device: torch.device) -> ChunkGeometry:
        """The chunk [s, e)'s geometry, identical in every layer; chunks of more than one
        query are padded (a decode step stays one) to a few row counts, so compiled
        attention sees a few shapes in a whole generation: flex pads to ``exc_block_size``,
        the window kernel to whole tiles (:func:`.window_joint.window_rows`)."""
        raise NotImplementedError

    def attend(self, layout: SlotLayout, q_loc, q_far, k_new, k_rot, k_raw, v, geo, slots):
        """Joint attention of one layer's chunk. q_loc/q_far: (B, H, Tp, d) rotated at the
        queries' positions / at n_local - 1; k_new: (B, Hkv, T, d) the chunk's own rotated
        keys; k_rot/k_raw/v: (B, Hkv, S, d + 2) the layer's slots; slots: (B, k) the pool
        slots of the selected blocks, or None. Returns the output (B, H, Tp, d), the local
        probabilities summed per slot (B, H, >= local_end) and the joint lse (B, H, Tp)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class FlexKernel(InfLLMKernel):
    """FlexAttention over block masks built from slot positions (:mod:`.flex_joint`)."""

    def __init__(self, compiled: bool = True, triton_scores: bool = False):
        self.compiled, self.triton_scores = compiled, triton_scores
        self.name = "flex" if compiled else "flex-eager"

    def geometry(self, layout, s, e, tail_start, rope, device):
        padded = 1 if e - s == 1 else layout.exc_block_size
        q_pos, cos, sin = query_rows(padded, s, e, rope, device)
        k_pos = layout.slot_positions(e, tail_start, device)
        masks = chunk_masks(q_pos, k_pos, layout.n_local, layout.group, layout.local_end)
        none_far = torch.zeros(layout.batch_size, layout.pool_end - layout.pool_slot, dtype=torch.bool,
                               device=device)
        return FlexGeometry(padded, cos, sin, q_pos, masks, k_pos.expand(layout.batch_size, -1),
                            far_tiles(masks, none_far, layout.pool_slot, layout.n_local))

    def attend(self, layout, q_loc, q_far, k_new, k_rot, k_raw, v, geo, slots):
        far_pos, far_lists = geo.far_pos, geo.far_lists
        if slots is not None:  # mark the selected blocks' pool slots far
            chosen = torch.zeros(slots.shape[0], layout.n_pool, dtype=torch.bool, device=slots.device)
            chosen.scatter_(1, slots, True)
            pool_far = chosen.repeat_interleave(layout.block_size, dim=1)  # (B, n_pool·bs)
            far_pos = geo.far_pos.clone()
            far_pos[:, layout.pool_slot:layout.pool_end] = torch.where(pool_far, FAR, EMPTY)
            far_lists = far_tiles(geo.masks, pool_far, layout.pool_slot, layout.n_local)
        k_self = F.pad(k_new, (0, 0, 0, geo.padded - k_new.shape[2]))  # (B, Hkv, Tp, d)
        return self._joint(q_loc, q_far, k_self, k_rot, k_raw, v, geo.masks, far_pos, far_lists,
                           layout.n_local)

    def _joint(self, *args):
        # on CUDA the representative scores come from the Triton kernel; on the CPU the
        # swapped flex call computes them (compiled, it is the faster there)
        return joint_attention_flex(*args, compiled=self.compiled,
                                    scores=representative_scores if self.triton_scores else None)


class DenseKernel(FlexKernel):
    """Flex's geometry, every logit materialised (:mod:`.dense_joint`): for debugging."""

    def __init__(self):
        super().__init__(compiled=False)
        self.name = "torch"

    def _joint(self, *args):
        return joint_attention_dense(*args)


class WindowKernel(InfLLMKernel):
    """Dense attention over each query tile's key window (:mod:`.window_joint`); a chunk
    whose keys are all local skips it (:mod:`.local_chunk`: measured faster on the CPU)."""

    local_path = True

    def __init__(self, compiled: bool = True):
        self.compiled = compiled
        self.name = "window" if compiled else "window-eager"

    def geometry(self, layout, s, e, tail_start, rope, device):
        T = e - s
        padded, tile, W, reach = window_sizes(window_rows(T, layout.exc_block_size), layout.n_init,
                                              layout.n_local, layout.block_size, layout.local_end)
        q_pos, cos, sin = query_rows(padded, s, e, rope, device)
        k_pos = layout.slot_positions(e, tail_start, device)
        # the slot after the chunk's last token
        last = e if e <= layout.n_init else layout.tail_slot + max(0, e - tail_start)
        win_idx, win_pos = window_slots(k_pos, padded, last, T, tile, W)
        return WindowGeometry(padded, cos, sin, q_pos, win_idx, win_pos, k_pos[:max(reach)], reach)

    def attend(self, layout, q_loc, q_far, k_new, k_rot, k_raw, v, geo, slots):
        block_slots = None if slots is None else layout.pool_slot + slots * layout.block_size  # (B, k)
        block_idx, block_used = block_keys(block_slots, layout.topk, layout.block_size, layout.batch_size,
                                           q_loc.device)
        attend = compiled_once("window", joint_attention_window) if self.compiled else joint_attention_window
        return attend(q_loc, q_far, k_rot, k_raw, v, geo.q_pos, geo.win_idx, geo.win_pos, geo.prefix_pos,
                      geo.reach, block_idx, block_used, layout.n_local, layout.local_end)


def make_kernel(kernel: "str | InfLLMKernel", device: torch.device | str) -> InfLLMKernel:
    """The kernel object an ``attention_kernel`` option names on ``device`` (a kernel
    object is returned as is): ``auto`` is ``window`` on the CPU (measured twice as fast
    there as compiled flex) and ``flex`` elsewhere; flex takes the Triton representative
    scores on CUDA."""
    if isinstance(kernel, InfLLMKernel):
        return kernel
    check_choice(kernel, ATTENTION_KERNELS, "attention kernel")
    kind = torch.device(device).type
    cuda = kind == "cuda"
    if kernel == "auto":
        kernel = "window" if kind == "cpu" else "flex"
    makers = {"window": lambda: WindowKernel(compiled=True),
              "window-eager": lambda: WindowKernel(compiled=False),
              "flex": lambda: FlexKernel(compiled=True, triton_scores=cuda),
              "flex-eager": lambda: FlexKernel(compiled=False, triton_scores=cuda),
              "torch": DenseKernel}
    return makers[kernel]()
