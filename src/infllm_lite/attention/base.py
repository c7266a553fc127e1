"""The one interface between the model and its attention memory.

Every attention layer projects its input to queries, keys and values **before RoPE** and
hands them to its :class:`LayerAttention`, which owns that layer's memory (a KV cache for
full attention; sinks + window for StreamingLLM; initial tokens, window, blocks for InfLLM)
and decides which positions to rotate by and which keys each query sees.

An :class:`AttentionState` holds the per-layer memories of one generation (a batch of
sequences advancing together) and the number of tokens consumed so far.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..rope import RotaryEmbedding


class LayerAttention:
    """One layer's attention memory; ``state`` is the :class:`AttentionState` it belongs to
    (None once that state is closed)."""

    state: "AttentionState | None"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor, rope: "RotaryEmbedding") -> torch.Tensor:
        """Store this call's keys/values and attend.

        q: (B, H, T, d), k/v: (B, Hkv, T, d), all un-rotated; positions: (T,) absolute
        positions of the T new tokens; cos/sin: (T, d) their rotation; rope: to rotate at
        other positions. Returns (B, H, T, d).
        """
        raise NotImplementedError

    @classmethod
    def attend_many(cls, layers: list["LayerAttention"], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    rope: "RotaryEmbedding") -> torch.Tensor:
        """One layer of B sequences in one model step, ``layers[b]`` the memory of sequence
        ``b`` (all of this class, each of batch size 1): row ``b`` of q (B, H, T, d) and k/v
        (B, Hkv, T, d), with positions (B, T) and cos/sin (B, T, d), goes to ``layers[b]``,
        and row ``b`` of the output (B, H, T, d) is exactly what ``layers[b].attend`` gives
        alone. This default calls each layer in turn; a memory overrides it to share the
        batch's work (one RoPE over the batch, ...)."""
        outs = [layer.attend(q[b:b + 1], k[b:b + 1], v[b:b + 1], positions[b], cos[b], sin[b], rope)
                for b, layer in enumerate(layers)]  # each (1, H, T, d)
        return torch.cat(outs, dim=0)

    def export(self) -> tuple[dict[str, torch.Tensor], dict]:
        """This layer's memory for a snapshot: tensors, and JSON-able host-side values."""
        raise NotImplementedError

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Load :meth:`export`'s output into this fresh layer memory of the same config."""
        raise NotImplementedError


def storage_dtype(memory, default: torch.dtype) -> torch.dtype:
    """The dtype a memory stores its kept keys and values in: ``memory.kv_dtype`` (a
    ``MemoryConfig``'s), else ``default`` (the model's)."""
    kind = getattr(memory, "kv_dtype", None)
    return default if kind is None else getattr(torch, kind)


def copy_into(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    """``dst[...] = src`` for a snapshot restore, refusing a shape that does not fit."""
    from ..errors import InfLLMLiteError
    if tuple(src.shape) != tuple(dst.shape):
        raise InfLLMLiteError(f"snapshot tensor {name} has shape {tuple(src.shape)}, this memory "
                              f"needs {tuple(dst.shape)}")
    dst.copy_(src)


class AttentionState:
    """Attention memory of all layers for one generation."""

    layers: list[LayerAttention]
    length: int  # tokens consumed so far (host-side count, never read inside compiled code)
    device: torch.device

    def export(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything needed to continue this generation elsewhere: the layers' tensors
        (``layers.{i}.{name}``) and a JSON-able dict (``length``, each layer's values)."""
        tensors, layers = {}, []
        for i, layer in enumerate(self.layers):
            t, meta = layer.export()
            tensors.update({f"layers.{i}.{name}": x for name, x in t.items()})
            layers.append(meta)
        return tensors, {"length": self.length, "layers": layers}

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Load :meth:`export`'s output into this fresh state (same mode, config and model)."""
        from ..errors import InfLLMLiteError
        if self.length:
            raise InfLLMLiteError("restore needs a fresh attention memory (this one has read tokens)")
        if len(meta["layers"]) != len(self.layers):
            raise InfLLMLiteError(f"the snapshot has {len(meta['layers'])} layers, the model {len(self.layers)}")
        self.length = int(meta["length"])  # the layers size what they read by it
        for i, (layer, layer_meta) in enumerate(zip(self.layers, meta["layers"])):
            prefix = f"layers.{i}."
            layer.restore({k[len(prefix):]: x for k, x in tensors.items() if k.startswith(prefix)},
                          layer_meta)

    def positions(self, n_tokens: int) -> torch.Tensor:
        """(n_tokens,) absolute positions of the next tokens, as a device tensor."""
        return torch.arange(self.length, self.length + n_tokens, device=self.device)

    def advance(self, n_tokens: int) -> None:
        """Record that n_tokens more tokens went through every layer."""
        self.length += n_tokens

    def stats(self):
        """The memory's block-pool counters (a ``memory.PoolStats``), or None for a memory
        without a block pool (full attention, StreamingLLM)."""
        return None

    def close(self) -> None:
        """End of the generation: drop the layers' references back to this state, so that
        its memory is freed as soon as the caller lets go of it, not at the garbage
        collector's next pass (measured, InfLLM at 8K: 0.4 GiB still held after a generation
        until ``gc.collect()``). The state is not used afterwards. Idempotent."""
        for layer in self.layers:
            layer.state = None


def attend_in_calls(state: AttentionState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    calls: list[int], rope: "RotaryEmbedding", layer: int = 0) -> torch.Tensor:
    """Feed one layer's un-rotated q (B, H, L, d) and k/v (B, Hkv, L, d) through
    ``state.layers[layer]`` in model calls of the given sizes, advancing the state as the
    model does; returns the outputs (B, H, L, d). For tests and benchmarks of one layer."""
    if sum(calls) != q.shape[2]:
        raise ValueError(f"calls {calls} do not add up to the {q.shape[2]} tokens given")
    outs, start = [], 0
    for size in calls:
        positions = state.positions(size)
        cos, sin = rope(positions, torch.float32)
        part = slice(start, start + size)
        outs.append(state.layers[layer].attend(q[:, :, part], k[:, :, part], v[:, :, part],
                                               positions, cos, sin, rope))
        state.advance(size)
        start += size
    return torch.cat(outs, dim=2)
