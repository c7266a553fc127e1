"""Full (ordinary causal) attention with a preallocated KV cache.

Keys are cached after RoPE at their absolute positions. Two ways to read the cache:

* eager (``static=False``): attend over the filled prefix ``[:end]``, sliced with the
  host-side length; the cheapest for variable-length calls;
* static (``static=True``): write with ``index_copy_`` at the position tensor and attend
  over the whole capacity under a mask, so every decode step has the same shapes and one
  ``torch.compile`` graph serves the whole generation.

The cache is stored in ``kv_dtype`` (``MemoryConfig.kv_dtype``, default the model's dtype):
a key or value is rounded once, when it is stored, and the call that stores it already
reads the rounded value, so a token reads the same in its own call and later (the output
does not depend on how a prompt is cut into calls); the attention arithmetic stays in the
queries' dtype, the cache read back into it.
"""

from __future__ import annotations

import torch

from ..config import ModelArgs
from ..causal import causal_attention, one_query_attention, prefix_causal_attention
from ..errors import InfLLMLiteError
from ..rope import apply_rope
from .base import AttentionState, LayerAttention, copy_into, storage_dtype
from .kv_arena import attend_by_bank, capacity_class


class FullLayerAttention(LayerAttention):
    """One layer's KV cache of ``capacity`` tokens."""

    def __init__(self, state: "FullAttentionState", args: ModelArgs, index: int):
        shape = (state.batch_size, args.n_kv_heads, state.capacity, args.head_dim)
        self.state = state
        self.window = args.sliding_window
        self.index = index  # this layer's number (its slab of an arena bank)
        self.row = state.row  # the arena row holding this cache, or None
        if self.row is not None:
            views = self.row.views(index)
            self.k, self.v = views["k"], views["v"]  # (1, Hkv, C', d) views of the row, C' >= C
            return
        self.k = torch.zeros(shape, dtype=state.kv_dtype, device=state.device)  # (B, Hkv, C, d), rotated
        self.v = torch.zeros(shape, dtype=state.kv_dtype, device=state.device)  # (B, Hkv, C, d)

    def _stored(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as the cache will hold it (rounded once to ``kv_dtype``), in its own dtype."""
        store = self.k.dtype
        return t if t.dtype == store else t.to(store).to(t.dtype)

    def _read(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Cached keys or values ``t`` in the attention's ``dtype`` (exact: a widening)."""
        return t if t.dtype == dtype else t.to(dtype)

    def attend(self, q, k, v, positions, cos, sin, rope):
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self._decodes(q):
            return self._decode(q, k, v)
        if self.state.static:
            self.k.index_copy_(2, positions, k.to(self.k.dtype))
            self.v.index_copy_(2, positions, v.to(self.v.dtype))
            return causal_attention(q, self._read(self.k, q.dtype), self._read(self.v, q.dtype),
                                    positions, self.state.slots, self.window)
        k, v = self._stored(k), self._stored(v)
        start = self.state.length
        end = start + q.shape[-2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        first = 0 if self.window is None else max(0, start - self.window + 1)
        if start == 0 and self.window is None:
            return causal_attention(q, k, v, positions, positions)
        if self.window is None and q.shape[-2] > 1 and q.device.type == "cpu":
            return prefix_causal_attention(q, self._read(self.k[:, :, :start], q.dtype),
                                           self._read(self.v[:, :, :start], q.dtype), k, v)
        return causal_attention(q, self._read(self.k[:, :, first:end], q.dtype),
                                self._read(self.v[:, :, first:end], q.dtype),
                                positions, self.state.slots[first:end], self.window)

    def _decodes(self, q: torch.Tensor) -> bool:
        """Whether this call is a decode step that sees every cached key (one query, no
        sliding window, the eager cache)."""
        return q.shape[-2] == 1 and self.window is None and not self.state.static

    def _decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store one rotated key/value (B, Hkv, 1, d) and attend every cached key with the
        rotated query (B, H, 1, d)."""
        end = self.state.length + 1  # (the model's ``state.positions`` refused a full cache)
        self.k[:, :, end - 1:end] = k
        self.v[:, :, end - 1:end] = v
        return one_query_attention(q, self._read(self.k[:, :, :end], q.dtype),
                                   self._read(self.v[:, :, :end], q.dtype))

    @classmethod
    def attend_many(cls, layers, q, k, v, positions, cos, sin, rope):
        """Decode steps of B sequences: one RoPE over the batch (elementwise, so each row's
        numbers are its own step's), then the caches that are rows of one arena bank
        together (:func:`attend_bank`), the others each alone; anything else goes
        through each layer's own ``attend``."""
        if not all(layer._decodes(q) for layer in layers):
            return super().attend_many(layers, q, k, v, positions, cos, sin, rope)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, 1, d): broadcast over heads
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return attend_by_bank(layers, q, k, v, _attend_group)

    def export(self):
        n = self.state.length
        return {"k": self.k[:, :, :n], "v": self.v[:, :, :n]}, {}

    def restore(self, tensors, meta):
        n = tensors["k"].shape[2]
        if n > self.k.shape[2]:
            raise InfLLMLiteError(f"the snapshot holds {n} tokens, more than this KV cache's "
                                  f"capacity of {self.k.shape[2]}")
        copy_into(self.k[:, :, :n], tensors["k"], "k")
        copy_into(self.v[:, :, :n], tensors["v"], "v")


def _attend_group(layers: list[FullLayerAttention], q, k, v) -> torch.Tensor:
    """Rotated decode rows of caches that are rows of one bank (several) or one cache."""
    return attend_bank(layers, q, k, v) if len(layers) > 1 else layers[0]._decode(q, k, v)


def attend_bank(layers: list[FullLayerAttention], q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
    """Decode steps of B sequences whose caches are rows of one arena bank: store each
    rotated key/value (B, Hkv, 1, d) at its row's next position, then attend the rotated
    queries (B, H, 1, d) over the bank's rows from the lowest to the highest of them, up to
    the longest length, in one batched matmul each for the scores and the output, each
    row's keys past its own length masked out (rows between them that are not in the
    batch attend garbage, dropped). Returns (B, H, 1, d)."""
    bank, i = layers[0].row.bank, layers[0].index
    rows = torch.tensor([layer.row.row for layer in layers], device=q.device)  # (B,)
    ends = torch.tensor([layer.state.length + 1 for layer in layers], device=q.device)  # (B,)
    lo, hi, end = int(rows.min()), int(rows.max()) + 1, int(ends.max())
    keys, values = bank.slab(i, "k"), bank.slab(i, "v")  # (R, Hkv, C, d)
    keys[rows, :, ends - 1] = k[:, :, 0]
    values[rows, :, ends - 1] = v[:, :, 0]
    B, H, _, d = q.shape
    Hkv = k.shape[1]
    grouped = q.new_zeros(hi - lo, Hkv, H // Hkv, d)  # (R', Hkv, G, d): rows lo..hi-1
    grouped[rows - lo] = q.reshape(B, Hkv, H // Hkv, d) * d ** -0.5  # scaled here: the fewest elements
    scores = grouped @ keys[lo:hi, :, :end].transpose(-1, -2)  # (R', Hkv, G, end)
    shortest = min(layer.state.length for layer in layers) + 1  # keys every row sees
    if shortest < end:  # mask only the columns some row does not see (rows outside the batch: dropped)
        limit = ends.new_full((hi - lo,), end)  # (R',) keys each row sees
        limit[rows - lo] = ends
        past = torch.arange(shortest, end, device=q.device) >= limit[:, None]  # (R', end - shortest)
        scores[..., shortest:].masked_fill_(past[:, None, None, :], float("-inf"))
    out = scores.softmax(dim=-1) @ values[lo:hi, :, :end]  # (R', Hkv, G, d)
    return out[rows - lo].reshape(B, H, 1, d)


class FullAttentionState(AttentionState):
    """KV caches of all layers, allocated once for ``capacity`` tokens, or held in a row of
    a :class:`~.kv_arena.Arena` bank (``row``, given back at :meth:`close`). ``memory``: a
    ``MemoryConfig`` whose ``kv_dtype`` the cache is stored in (its other fields do not
    apply to full attention); None, or no ``kv_dtype``: ``dtype``, the model's."""

    def __init__(self, args: ModelArgs, capacity: int, *, batch_size: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 static: bool = False, row=None, memory=None):
        if capacity < 1:
            raise InfLLMLiteError(f"KV cache capacity must be positive, got {capacity}")
        if row is not None and (batch_size != 1 or static or row.views(0)["k"].shape[2] < capacity):
            raise InfLLMLiteError("an arena row holds one eager cache of at most its capacity")
        self.batch_size, self.capacity, self.dtype = batch_size, capacity, dtype
        self.kv_dtype = storage_dtype(memory, dtype) if row is None else row.views(0)["k"].dtype
        self.device = torch.device(device)
        self.static = static
        self.length = 0
        self.row = row
        self.slots = torch.arange(capacity, device=self.device)  # (C,) position held by each slot
        self.layers = [FullLayerAttention(self, args, i) for i in range(args.n_layers)]

    @classmethod
    def in_arena(cls, arena, args: ModelArgs, capacity: int, dtype: torch.dtype) -> "FullAttentionState | None":
        """A cache of ``capacity`` tokens in a row of ``arena`` (a :class:`~.kv_arena.Arena`:
        rows of one power-of-two capacity class share a bank), or None where that row
        would be too large for a bank."""
        size = capacity_class(capacity)
        shape = (args.n_kv_heads, size, args.head_dim)
        row = arena.take(("full", size), {"k": shape, "v": shape}, dtype)
        return None if row is None else cls(args, capacity, dtype=dtype, device=arena.device, row=row)

    def close(self) -> None:
        """As :meth:`AttentionState.close`; an arena row is given back (its pages freed)."""
        super().close()
        if self.row is not None:
            self.row.release()
            self.row = None
            for layer in self.layers:
                layer.row = None

    def positions(self, n_tokens: int) -> torch.Tensor:
        if self.length + n_tokens > self.capacity:
            raise InfLLMLiteError(
                f"the KV cache holds {self.capacity} tokens; {self.length} used, "
                f"{n_tokens} more requested")
        return self.slots[self.length:self.length + n_tokens].clone()  # fresh tensor: no storage offset for compiled graphs to guard on
