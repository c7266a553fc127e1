"""This machine's float32 roofline with torch on the CPU, the embedded model's cost model,
and the fraction of the roofline a measured prefill / decode rate reaches.

    python bench/roofline.py [--threads N] [--out docs/results/roofline.json]

Peaks (medians of ``--runs`` timed calls after a warm-up, in ``--threads`` threads):

* matmul GFLOP/s: ``torch.mm`` of square float32 matrices (1024, 2048) and the model's
  own prefill GEMMs (``F.linear`` of T tokens through the SwiGLU up projection
  dim -> intermediate and the down projection back, T = 512, 2048); the peak is the best;
* bandwidth GB/s: ``dst.copy_(src)`` of ``--mbytes`` MB (read + write bytes counted) and a
  read-only ``x.sum()`` of the same size; the bound is the faster of the two.

Cost model (``Cost``), batch 1, float32, per layer ``H`` query heads of size ``d``:

* prefill FLOPs per token, averaged over a prompt of C tokens:
  ``2·L·P_layer + 4·L·H·d·mean_t keys(t) + 2·V·D/C``, with ``P_layer`` the weights of one
  layer's matmuls, ``keys(t)`` the keys a query at position t attends (full: t + 1;
  streaming: ``min(t+1, n_init + n_local)``; infllm: that plus
  ``block_size · min(topk, blocks formed before t)``, the pending remainder left out) and one
  row of logits per prompt (the library's prefill computes the last position's logits only);
* decode bytes per token at context C: every weight once (all layers' matrices, norms and
  biases, the final norm, the whole LM head, one embedding row), K and V of ``keys(C)``
  keys in all layers, and for infllm the representative vectors scored by the retrieval
  (``L · blocks · H·d`` float32, every decode step being a chunk of its own).

These count the algorithm's work, not the implementation's (InfLLM's flex path does the
QK product twice over, static-shape decode reads padded buffers): a fraction near 1 means
the work the algorithm needs runs at the machine's speed.

``roofline(prefill_tok_s, decode_tok_s, context, mode)`` is what other benchmarks import
(``sys.path.insert(0, str(Path(__file__).parent))``, then ``from roofline import roofline``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from infllm_lite.config import ModelArgs
from infllm_lite.memory_config import MemoryConfig, n_formed_blocks

MODES = ("full", "streaming", "infllm")
SQUARE_SIZES = (1024, 2048)
PREFILL_TOKENS = (512, 2048)
BOUND_CONTEXTS = (2048, 8192, 32768, 131072)  # the CLI's table of bounds


# --------------------------------------------------------------------------- the machine


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    """Median wall time of ``runs`` calls of ``fn`` after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(m: int, k: int, n: int, runs: int = 5) -> float:
    """GFLOP/s of ``torch.mm`` of float32 (m, k) @ (k, n): 2·m·k·n FLOPs a call."""
    a, b = torch.randn(m, k), torch.randn(k, n)  # (m, k), (k, n)
    out = torch.empty(m, n)  # (m, n)
    return 2 * m * k * n / median_seconds(lambda: torch.mm(a, b, out=out), runs) / 1e9


def linear_gflops(tokens: int, d_in: int, d_out: int, runs: int = 5) -> float:
    """GFLOP/s of ``F.linear`` (what ``nn.Linear`` runs) of (tokens, d_in) by a weight (d_out, d_in)."""
    x, w = torch.randn(tokens, d_in), torch.randn(d_out, d_in)  # (T, d_in), (d_out, d_in)
    return 2 * tokens * d_in * d_out / median_seconds(lambda: F.linear(x, w), runs) / 1e9


def copy_gb_s(nbytes: int, runs: int = 5) -> float:
    """GB/s of ``dst.copy_(src)`` of ``nbytes`` float32 bytes, read + write counted."""
    src = torch.rand(nbytes // 4)  # (N,)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_seconds(lambda: dst.copy_(src), runs) / 1e9


def read_gb_s(nbytes: int, runs: int = 5) -> float:
    """GB/s of a read-only reduction ``x.sum()`` over ``nbytes`` float32 bytes."""
    x = torch.rand(nbytes // 4)  # (N,)
    return x.numel() * 4 / median_seconds(x.sum, runs) / 1e9


def measure_peaks(args: ModelArgs, runs: int = 5, mbytes: int = 512) -> dict:
    """The machine's float32 peaks at the current thread count: ``matmul`` GFLOP/s per
    shape (squares, and the prefill GEMMs of ``args``), ``peak_gflop_s`` (the best of them),
    ``copy_gb_s``, ``read_gb_s``, ``bandwidth_gb_s`` (the faster of the two), ``threads``."""
    matmul = {f"square_{n}": matmul_gflops(n, n, n, runs) for n in SQUARE_SIZES}
    for t in PREFILL_TOKENS:
        matmul[f"up_{t}x{args.dim}x{args.intermediate_size}"] = linear_gflops(
            t, args.dim, args.intermediate_size, runs)
        matmul[f"down_{t}x{args.intermediate_size}x{args.dim}"] = linear_gflops(
            t, args.intermediate_size, args.dim, runs)
    copy, read = copy_gb_s(mbytes << 20, runs), read_gb_s(mbytes << 20, runs)
    return dict(matmul=matmul, peak_gflop_s=max(matmul.values()),
                copy_gb_s=copy, read_gb_s=read, bandwidth_gb_s=max(copy, read),
                threads=torch.get_num_threads())


def machine_info() -> dict:
    """Platform, CPU model, cores, torch threads and version, the SIMD level torch uses,
    and the load average (the machines are shared: a loaded one measures low)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(platform=platform.platform(), cpu=cpu, cores=os.cpu_count(),
                threads=torch.get_num_threads(), torch=torch.__version__,
                cpu_capability=torch.backends.cpu.get_cpu_capability(),
                load_average=[round(x, 2) for x in os.getloadavg()])


# --------------------------------------------------------------------------- the model's cost


@functools.cache
def embedded_args() -> ModelArgs:
    """The embedded SmolLM2-135M-Instruct's hyper-parameters (its config.json; no weights read)."""
    from infllm_lite.weights.embedded import embedded_model_dir
    from infllm_lite.weights.hf_folder import read_hf_config

    return ModelArgs.from_hf_config(read_hf_config(embedded_model_dir(progress=False)))


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes of the model ``args`` in attention ``mode`` (``memory`` for
    streaming / infllm, default ``MemoryConfig.for_model(args)``); float32 by default."""

    args: ModelArgs
    mode: str = "full"
    memory: MemoryConfig | None = None
    bytes_per_element: int = 4

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.memory is None:
            object.__setattr__(self, "memory", MemoryConfig.for_model(self.args))

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one layer's matmuls: q, k, v, o projections and the SwiGLU MLP."""
        a = self.args
        return (2 * a.dim * a.n_heads * a.head_dim + 2 * a.dim * a.n_kv_heads * a.head_dim
                + 3 * a.dim * a.intermediate_size)

    @property
    def layer_params(self) -> int:
        """Every parameter of one layer: matmul weights, biases, the two RMSNorm weights."""
        a = self.args
        bias = ((a.n_heads + 2 * a.n_kv_heads) * a.head_dim if a.qkv_bias else 0) \
            + (a.dim if a.o_bias else 0) + (2 * a.intermediate_size + a.dim if a.mlp_bias else 0)
        return self.layer_matmul_params + bias + 2 * a.dim

    @property
    def n_params(self) -> int:
        """Parameters of the whole model (an LM head tied to the embeddings counted once)."""
        a = self.args
        return a.n_layers * self.layer_params + a.dim + a.vocab_size * a.dim * (1 if a.tie_word_embeddings else 2)

    def keys(self, positions: torch.Tensor) -> torch.Tensor:
        """Keys a query attends at each of ``positions`` (N,) int64 -> (N,) int64."""
        seen = positions + 1
        if self.mode == "full":
            return seen
        m = self.memory
        near = seen.clamp(max=m.n_init + m.n_local)
        if self.mode == "streaming":
            return near
        formed = ((positions - m.n_local - m.n_init) // m.block_size).clamp(min=0)  # n_formed_blocks before t
        return near + m.block_size * formed.clamp(max=m.topk)

    def attention_flops_per_key(self) -> int:
        """QKᵀ and PV of one query with one key, all layers: 4·L·H·d."""
        a = self.args
        return 4 * a.n_layers * a.n_heads * a.head_dim

    def prefill_flops_per_token(self, context: int) -> float:
        """Mean FLOPs per token of prefilling a ``context``-token prompt (logits of its last
        position only)."""
        a = self.args
        mean_keys = self.keys(torch.arange(context, dtype=torch.long)).double().mean().item()
        return (2 * a.n_layers * self.layer_matmul_params + self.attention_flops_per_key() * mean_keys
                + 2 * a.vocab_size * a.dim / context)

    @property
    def weight_bytes_per_token(self) -> int:
        """Weights one decode step reads: all layers, final norm, whole LM head, one embedding row."""
        a = self.args
        return self.bytes_per_element * (a.n_layers * self.layer_params + a.dim + a.vocab_size * a.dim + a.dim)

    def decode_bytes_per_token(self, context: int) -> float:
        """Bytes one decode step reads with ``context`` tokens before it: the weights, K and V
        of the keys it attends, and (infllm) the representative vectors it scores."""
        a = self.args
        keys = int(self.keys(torch.tensor([context])).item())
        kv = 2 * a.n_layers * a.n_kv_heads * a.head_dim * self.bytes_per_element * keys
        retrieval = 0
        if self.mode == "infllm":
            retrieval = 4 * a.n_layers * n_formed_blocks(self.memory, context) * a.n_heads * a.head_dim
        return self.weight_bytes_per_token + kv + retrieval


_PEAKS: dict[tuple[int, int, int], dict] = {}  # measured peaks by (threads, dim, intermediate)


def roofline(prefill_tokens_per_s: float | None, decode_tokens_per_s: float | None, context: int,
             mode: str, *, args: ModelArgs | None = None, memory: MemoryConfig | None = None,
             peaks: dict | None = None) -> dict:
    """How close measured rates come to this machine's roofline.

    ``context``: the prompt length of the prefill rate, and the context of the decode rate;
    ``args``: the model (default the embedded one); ``peaks``: from :func:`measure_peaks`
    (measured now when omitted, once per process and thread count) or a ``roofline.json``
    written by this script, taken with the thread count the rates were. Either rate may be
    None (its fields are then None). Returns a dict of ``prefill_flops_per_token``,
    ``prefill_gflop_s`` (reached), ``peak_gflop_s``, ``prefill_fraction`` (reached / peak),
    ``prefill_bound_tok_s`` (peak / FLOPs per token), ``decode_bytes_per_token``,
    ``decode_gb_s`` (reached), ``bandwidth_gb_s``, ``decode_fraction`` (reached /
    bandwidth), ``decode_bound_tok_s`` (bandwidth / bytes per token), ``mode``, ``context``.
    """
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    cost = Cost(args or embedded_args(), mode, memory)
    if peaks is None:
        key = (torch.get_num_threads(), cost.args.dim, cost.args.intermediate_size)
        if key not in _PEAKS:
            _PEAKS[key] = measure_peaks(cost.args)
        peaks = _PEAKS[key]
    flops, nbytes = cost.prefill_flops_per_token(context), cost.decode_bytes_per_token(context)
    peak, bandwidth = peaks["peak_gflop_s"], peaks["bandwidth_gb_s"]
    gflop_s = None if prefill_tokens_per_s is None else prefill_tokens_per_s * flops / 1e9
    gb_s = None if decode_tokens_per_s is None else decode_tokens_per_s * nbytes / 1e9
    return dict(mode=mode, context=context,
                prefill_flops_per_token=flops, prefill_gflop_s=gflop_s, peak_gflop_s=peak,
                prefill_fraction=None if gflop_s is None else gflop_s / peak,
                prefill_bound_tok_s=peak * 1e9 / flops,
                decode_bytes_per_token=nbytes, decode_gb_s=gb_s, bandwidth_gb_s=bandwidth,
                decode_fraction=None if gb_s is None else gb_s / bandwidth,
                decode_bound_tok_s=bandwidth * 1e9 / nbytes)


def load_peaks(path: str | os.PathLike) -> dict:
    """The ``peaks`` of a JSON this script wrote (for :func:`roofline` without measuring)."""
    return json.loads(Path(path).read_text())["peaks"]


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--runs", type=int, default=5, help="timed calls per measurement (median)")
    p.add_argument("--mbytes", type=int, default=512, help="size of the bandwidth tensors, MB")
    p.add_argument("--out", type=Path, default=None, help="write machine, peaks and bounds as JSON here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from infllm_lite import load_model

    model, _ = load_model(None, dtype=torch.float32, device="cpu", progress=False)
    args = model.args
    cost = Cost(args)
    real = sum(t.numel() for t in {id(t): t for t in model.parameters()}.values())
    if real != cost.n_params:
        raise SystemExit(f"cost model counts {cost.n_params} parameters, the model has {real}")
    del model
    peaks = measure_peaks(args, a.runs, a.mbytes)
    machine = machine_info()
    bounds = [roofline(None, None, c, mode, args=args, peaks=peaks) for mode in ("full", "infllm")
              for c in BOUND_CONTEXTS]

    print(f"{machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, "
          f"load average {machine['load_average'][0]}\n")
    print("| measure | value |\n|---|---|")
    for shape, g in peaks["matmul"].items():
        print(f"| matmul {shape} | {g:.1f} GFLOP/s |")
    print(f"| peak matmul (best shape) | {peaks['peak_gflop_s']:.1f} GFLOP/s |")
    print(f"| copy (read + write) | {peaks['copy_gb_s']:.1f} GB/s |")
    print(f"| read (sum) | {peaks['read_gb_s']:.1f} GB/s |")
    print(f"| weights read per decoded token | {cost.weight_bytes_per_token / 1e6:.0f} MB "
          f"({cost.n_params / 1e6:.1f} M parameters) |")
    print(f"| decode bound, weights only | {peaks['bandwidth_gb_s'] * 1e9 / cost.weight_bytes_per_token:.1f} tok/s |")
    print("\n| mode | context | prefill GFLOP/token | prefill bound tok/s | decode MB/token | decode bound tok/s |")
    print("|---|---|---|---|---|---|")
    for b in bounds:
        print(f"| {b['mode']} | {b['context']} | {b['prefill_flops_per_token'] / 1e9:.3f} | "
              f"{b['prefill_bound_tok_s']:.0f} | {b['decode_bytes_per_token'] / 1e6:.0f} | "
              f"{b['decode_bound_tok_s']:.1f} |")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        model_info = dict(name="SmolLM2-135M-Instruct", args=asdict(args), n_params=cost.n_params,
                          weight_bytes_per_token=cost.weight_bytes_per_token,
                          memory=MemoryConfig.for_model(args).to_dict())
        a.out.write_text(json.dumps(dict(machine=machine, peaks=peaks, model=model_info, bounds=bounds,
                                         runs=a.runs, mbytes=a.mbytes), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
