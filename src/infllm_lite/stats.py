"""``GenerationStats``: what one generation did — tokens, time per phase and, with a
context memory, the block pools' counters (hits, misses, bytes moved per tier)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from .memory import PoolStats
from .models.quantized import kernels_used


@dataclass
class GenerationStats:
    """Filled in as a generation runs; complete once it has finished."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # the steps after the first new token
    memory: PoolStats | None = None  # infllm: the block pools of all layers added up
    prefill_memory: PoolStats | None = None  # the same, when the prefill ended

    @property
    def linear_kernels(self) -> str | None:
        """The linear layers' kernels this process has run (``int4:packed-bf16``,
        ``int8:dequant-f32``, ``float32:onednn``, ...): which kernel the probe chose."""
        return kernels_used()

    @property
    def decode_memory(self) -> PoolStats | None:
        """The pools' counters of the decode steps alone."""
        if self.memory is None or self.prefill_memory is None:
            return None
        return self.memory - self.prefill_memory

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(0, self.new_tokens - 1)  # the first new token comes from the prefill
        return steps / self.decode_seconds if self.decode_seconds else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["prefill_tokens_per_second"] = self.prefill_tokens_per_second
        out["decode_tokens_per_second"] = self.decode_tokens_per_second
        out["linear_kernels"] = self.linear_kernels
        if self.memory is not None:
            out["memory"]["hit_rate"] = self.memory.hit_rate
        if self.decode_memory is not None:
            out["decode_memory"] = {**asdict(self.decode_memory), "hit_rate": self.decode_memory.hit_rate}
        return out

    def summary(self) -> str:
        """One human line (two with a memory)."""
        line = (f"prompt {self.prompt_tokens} tok, prefill {self.prefill_seconds:.1f} s "
                f"({self.prefill_tokens_per_second:.0f} tok/s); {self.new_tokens} new tok, "
                f"decode {self.decode_tokens_per_second:.1f} tok/s")
        if kernels := self.linear_kernels:
            line += f"; linear kernels {kernels}"
        m = self.memory
        if m is None:
            return line
        mib = 1 << 20
        used = (f"hit rate {m.hit_rate:.1%} ({m.hits} hits, {m.misses} misses)" if m.hits + m.misses
                else "no blocks used")
        return (f"{line}\nmemory: {m.blocks} blocks ({m.blocks_host} host, {m.blocks_disk} disk, "
                f"{m.blocks_fast} cached), {used}, "
                f"moved {m.bytes_slow_to_fast / mib:.1f} MiB to the fast tier, "
                f"{m.bytes_host_to_disk / mib:.1f} MiB to disk, {m.bytes_disk_to_host / mib:.1f} MiB from disk")


def device_clock(device: torch.device) -> float:
    """Seconds, after the device's queued work (so phases are timed, not launches)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
