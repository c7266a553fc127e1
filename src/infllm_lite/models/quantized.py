"""Weight-only quantized linear layers: per-channel (or group-wise) int8 and group-wise
int4, each with a dequantize-to-float32 twin, and the kernel that runs them, chosen per
machine.

Packs (the canonical form; ``state_dict`` holds it, GGUF blocks load into it as they are):

* ``int8``: ``qweight`` int8 (out, groups, G), ``scales`` (out, groups): ``w = q * s``
  (symmetric; per-channel is one group per row, ``round(w / s)``, ``s = amax / 127``).
  GGUF Q8_0 is the same with groups of 32 and float16 scales, Q6_K with groups of 16.
* ``int4``: ``qweight`` uint8 (out, in / G, G / 2), ``scales`` and ``offsets``
  (out, in / G): ``w = q * s + o`` with ``q`` in 0..15 (asymmetric, ``o`` the group's
  minimum). Byte ``j`` of a group holds ``q[j]`` in its low nibble and ``q[j + G/2]`` in
  its high one: GGUF's Q4_0/Q4_1 block layout, so a Q4_1 block *is* a pack (``s = d``,
  ``o = m``; Q4_0: ``o = -8 d``; Q4_K, regrouped, float32 ``s``, ``o``). Our own
  quantization stores ``s``, ``o`` as float16.

The twin (``dequantize``) computes ``q * s + o`` in float32 as two separate operations
(no fused multiply-add), the arithmetic of the ``gguf`` package: equal to its
dequantization bit for bit.

Kernels (``quant_kernel``; ``INFLLM_LITE_QUANT_KERNEL=packed|dequant`` or
``set_quant_kernel`` override; resolved once per process and scheme on the CPU):

* ``packed``: ``torch._weight_int8pack_mm`` (per-channel int8) and
  ``torch._weight_int4pack_mm_for_cpu`` (int4; its own tiled copy of the pack, made once):
  bf16 activations and scales, float32 accumulation, the output cast back. These are
  ATen's own integer kernels, not bf16 GEMMs, so they are fast even on a CPU without
  AVX512-BF16. Measured on this machine (AMD EPYC, one thread, 8 weights of 1536 x 576,
  ms per weight): 1 row: float32 ``F.linear`` 0.33, oneDNN 0.27, int8 pack 0.12, int8
  dequantize 0.125, int4 pack 0.05, int4 dequantize (eager) 3.7, int4 dequantize + GEMV
  under ``torch.compile`` 0.40 (11 s to compile); 8 rows: float32 0.97, int8 pack 0.72,
  int4 pack 0.18; 512 rows (prefill): float32 21.4, int8 pack 29.0, int8 dequantize
  22.1, int4 pack 23.5.
* ``dequant``: the weight dequantized to the activations' dtype per call, in row chunks
  that stay in cache (``CHUNK_ELEMENTS``), then ``F.linear`` (int8: the per-row scale
  applied to the output instead). float32 arithmetic throughout on the CPU; the kernel
  for int4 layers whose output size is not a multiple of 16 (the int4 pack needs that),
  for prefill products of grouped int8, and on other devices.

Grouped int8 (GGUF Q8_0: the embedded model's tied embedding and LM head, 49152 x 576)
on the ``packed`` kernel: one ``_weight_int8pack_mm`` per group of 32 (unit scales; the
group's scale applied in float32), over the pack stored once as (groups, out, G). The
head at one row: 8.8 ms against float32's 22 and 34 to 88 ms dequantized in chunks
(converting 28 M int8 to float32 is bound by writing them); at 8 rows 41 against 29, so
products over more than ``FEW_ROWS`` rows dequantize instead.

The probe (:func:`quant_kernel`) times both on a decoder-sized weight at one row and
takes ``packed`` only where it beats ``dequant`` by a fifth (float32 is the more exact).

Prefill (:func:`prefill_kernel`): products over more than ``PREFILL_ROWS`` rows of a
``packed`` layer run as ``dequant-bf16`` where that is fast: the weight dequantized in
float32 a chunk of rows at a time, rounded to bf16, and one bf16 GEMM (oneDNN, float32
accumulation) with the activations rounded to bf16 (per-channel int8: the int8 values,
exact in bf16, and the scale applied to the float32 output). ATen's int4/int8 pack
kernels are GEMVs at heart: at 2,048 rows they run no faster than float32, while a bf16
GEMM on a CPU with AVX512-BF16 or AMX runs 2.5-3x faster than float32. Chosen once per
process and scheme: ``float32`` (the ``packed``/``dequant`` kernel as above) on CPUs
without those instructions (bf16 GEMMs there run hundreds of times slower), else a probe at
512 rows takes ``bf16`` where it beats the packed kernel by a fifth. Override with
``INFLLM_LITE_QUANT_PREFILL=bf16|float32`` or :func:`set_prefill_kernel`. Layers on the
``dequant`` kernel stay float32 throughout. The bf16 GEMM's rows do not depend on the
other rows (checked here at 1 to 1,000 of 2,048), so batch-1 prefill in calls of any size
gives the same bits; a batched engine step that mixes decode rows with a long prompt chunk
takes it for its decode rows too (within the tolerance of the tests, not bit-equal to the
sequence decoding alone, as float32's BLAS and oneDNN differ there).
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InfLLMLiteError
from ..options import QUANTIZE_CHOICES
from .linear import FEW_ROWS, Linear, chosen_cpu_linear_kernel

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
DEFAULT_INT4_GROUP = 32  # divides every dimension of the embedded model (576 is not a multiple of 128)
QUANT_KERNELS = ("packed", "dequant")
_ENV = "INFLLM_LITE_QUANT_KERNEL"
CHUNK_ELEMENTS = 1 << 19  # dequantize at most this many weights at a time (2 MiB in float32)
PREFILL_ROWS = 128  # products over more rows of a packed layer may take the bf16 GEMM
PREFILL_KERNELS = ("bf16", "float32")
_PREFILL_ENV = "INFLLM_LITE_QUANT_PREFILL"

_chosen: dict[str, str] = {}  # scheme -> kernel, this process
_prefill: dict[str, str] = {}  # scheme -> prefill kernel, this process
_used: dict[str, None] = {}  # "scheme:kernel" labels of layers that have run, in order


# ---------------------------------------------------------------------------- options


def check_quantize(quantize: str | None, group_size: int | None) -> tuple[str | None, int | None]:
    """``(quantize, group_size)`` validated and completed (int4's default group), or one
    clear error: checked before any work."""
    if quantize is None:
        if group_size is not None:
            raise InfLLMLiteError("group_size applies only with quantize='int4'")
        return None, None
    if quantize not in QUANTIZE_CHOICES:
        raise InfLLMLiteError(f"unknown quantize value {quantize!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "int4":
        group_size = DEFAULT_INT4_GROUP if group_size is None else group_size
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in INT4_GROUP_SIZES:
            raise InfLLMLiteError(f"int4 group size {group_size!r}: choose one of "
                                  f"{', '.join(map(str, INT4_GROUP_SIZES))}")
        return quantize, group_size
    if group_size is not None:
        why = "int8 is per-channel" if quantize == "int8" else "a GGUF file's blocks fix the groups"
        raise InfLLMLiteError(f"group_size applies only with quantize='int4' ({why})")
    return quantize, None


def check_divides(args, group_size: int) -> None:
    """Every quantized linear's input size must be a multiple of ``group_size``."""
    sizes = {"hidden size": args.dim, "attention output size": args.n_heads * args.head_dim,
             "intermediate size": args.intermediate_size}
    for what, size in sizes.items():
        if size % group_size:
            fits = [str(g) for g in INT4_GROUP_SIZES if all(s % g == 0 for s in sizes.values())]
            hint = f"choose {' or '.join(fits)}" if fits else "int8 instead"
            raise InfLLMLiteError(f"int4 group size {group_size} does not divide the model's {what} {size}: {hint}")


# ---------------------------------------------------------------------------- packing


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel symmetric int8: ``(q (out, in) int8, scales (out, 1) float32)``."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True)
    scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(w / scales).clamp_(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric int4: ``(packed uint8 (out, in/G, G/2), scales, offsets)``,
    the last two float16 (out, in/G); ``q = round((w - o) / s)`` clamped to 0..15 with
    the float16 ``s`` and ``o``."""
    out, n = w.shape
    if group_size % 2 or group_size <= 0 or n % group_size:
        raise InfLLMLiteError(f"int4 group size {group_size} does not divide the input size {n}")
    g = w.detach().float().reshape(out, n // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo) / 15).to(torch.float16)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    offsets = lo.to(torch.float16)
    q = torch.round((g - offsets.float()[..., None]) / scales.float()[..., None]).clamp_(0, 15).to(torch.uint8)
    return pack_int4(q.reshape(out, n), group_size), scales, offsets


def pack_int4(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """``q`` (out, in) uint8 in 0..15 -> (out, in/G, G/2) bytes, low nibble ``q[j]``,
    high nibble ``q[j + G/2]`` of each group (GGUF's layout)."""
    out, n = q.shape
    if group_size % 2 or group_size <= 0 or n % group_size:
        raise InfLLMLiteError(f"int4 group size {group_size} does not divide the input size {n}")
    if q.dtype != torch.uint8 or (q.numel() and int(q.max()) > 15):
        raise InfLLMLiteError("pack_int4 takes uint8 values in 0..15")
    g = q.reshape(out, n // group_size, group_size)
    half = group_size // 2
    return g[..., :half] | (g[..., half:] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(out, in/G, G/2) bytes -> (out, in) uint8 values in 0..15."""
    out, groups, _ = packed.shape
    return torch.cat((packed & 15, packed >> 4), dim=-1).reshape(out, -1)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``q`` (out, in) or (out, groups, G), ``scales`` (out, groups) -> (out, in)."""
    out, groups = scales.shape
    w = q.to(dtype, copy=True).reshape(out, groups, -1)
    return w.mul_(scales.to(dtype)[..., None]).reshape(out, -1)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                    dtype=torch.float32) -> torch.Tensor:
    """``q * s + o`` as two operations, in place in one new tensor (fresh temporaries made
    it 9x slower here: 1.7 against 0.19 ms for 910 x 576 weights)."""
    out, groups, half = packed.shape
    w = torch.empty(out, groups, 2 * half, dtype=dtype, device=packed.device)  # (out, groups, G)
    w[..., :half] = packed & 15
    w[..., half:] = packed >> 4
    return w.mul_(scales.to(dtype)[..., None]).add_(offsets.to(dtype)[..., None]).reshape(out, groups * 2 * half)


# ---------------------------------------------------------------------------- kernel choice


def _checked(kernel: str, where: str, choices: tuple[str, ...] = QUANT_KERNELS) -> str:
    if kernel not in choices:
        raise InfLLMLiteError(f"{where}: choose one of {', '.join(choices)}")
    return kernel


def _median_ms(f, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2] * 1e3


def _probe(scheme: str) -> str:
    """``packed`` if ATen's integer kernel beats the float32 dequantization by a fifth
    at one row on 4 weights of 1536 x 576 (medians of 5 calls), else ``dequant``."""
    with torch.inference_mode():
        gen = torch.Generator().manual_seed(0)
        layers = [QuantizedLinear.from_float(torch.randn(1536, 576, generator=gen), None, scheme,
                                             DEFAULT_INT4_GROUP if scheme == "int4" else None)
                  for _ in range(4)]
        x = torch.randn(1, 576, generator=gen)
        times = {}
        for kernel in QUANT_KERNELS:
            for layer in layers:
                layer.prepare(kernel)
            run = (lambda: [layer._packed(x) for layer in layers]) if kernel == "packed" else (
                lambda: [layer._dequantized(x) for layer in layers])
            run()  # warm up
            times[kernel] = _median_ms(run)
    return "packed" if times["packed"] < 0.8 * times["dequant"] else "dequant"


def quant_kernel(scheme: str) -> str:
    """The CPU kernel of ``scheme`` in this process (see the module): the override, or
    the probe's choice (run once)."""
    if scheme not in _chosen:
        forced = os.environ.get(_ENV)
        _chosen[scheme] = _probe(scheme) if forced is None else _checked(forced, f"{_ENV}={forced!r}")
    return _chosen[scheme]


def set_quant_kernel(kernel: str | None) -> None:
    """Choose the quantized layers' CPU kernel (``packed`` / ``dequant``) for layers
    quantized from now on, or None to probe again."""
    _chosen.clear()
    if kernel is not None:
        _checked(kernel, f"unknown quantized kernel {kernel!r}")
        _chosen.update({scheme: kernel for scheme in SCHEMES})


def fast_bf16_cpu() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _probe_prefill(scheme: str) -> str:
    """``bf16`` if this CPU has bf16 dot products and the bf16 GEMM beats the packed
    kernel by a fifth at 512 rows on 2 weights of 1536 x 576 (the best of 7 calls each,
    interleaved: a median of 5 in a row flipped the choice on a noisy machine), else ``float32``."""
    if not fast_bf16_cpu():
        return "float32"
    with torch.inference_mode():
        gen = torch.Generator().manual_seed(0)
        layers = [QuantizedLinear.from_float(torch.randn(1536, 576, generator=gen), None, scheme,
                                             DEFAULT_INT4_GROUP if scheme == "int4" else None).prepare("packed", prefill="float32")
                  for _ in range(2)]
        x = torch.randn(512, 576, generator=gen)
        runs = {"float32": lambda: [layer._packed(x) for layer in layers],
                "bf16": lambda: [layer._dequantized(x, torch.bfloat16) for layer in layers]}
        times = {name: [] for name in runs}
        for name, run in runs.items():
            run()  # warm up (oneDNN makes its kernels on first use)
        for _ in range(7):
            for name, run in runs.items():
                times[name].append(_median_ms(run, 1))
    return "bf16" if min(times["bf16"]) < 0.8 * min(times["float32"]) else "float32"


def prefill_kernel(scheme: str) -> str:
    """How a ``packed`` layer of ``scheme`` multiplies more than ``PREFILL_ROWS`` rows in
    this process (see the module): ``bf16`` or ``float32``; the override or the probe's
    choice (run once)."""
    if scheme not in _prefill:
        forced = os.environ.get(_PREFILL_ENV)
        _prefill[scheme] = (_probe_prefill(scheme) if forced is None
                            else _checked(forced, f"{_PREFILL_ENV}={forced!r}", PREFILL_KERNELS))
    return _prefill[scheme]


def set_prefill_kernel(kernel: str | None) -> None:
    """Choose how packed layers quantized from now on multiply prefill-sized inputs
    (``bf16`` / ``float32``), or None to probe again."""
    _prefill.clear()
    if kernel is not None:
        _checked(kernel, f"unknown quantized prefill kernel {kernel!r}", PREFILL_KERNELS)
        _prefill.update({scheme: kernel for scheme in SCHEMES})


def kernels_used() -> str | None:
    """The linear kernels this process's layers have run, e.g. ``int4:packed-bf16,
    float32:onednn`` (None before any ran)."""
    labels = list(_used)
    if float32 := chosen_cpu_linear_kernel():
        labels.append(f"float32:{float32}")
    return ", ".join(labels) or None


# ---------------------------------------------------------------------------- layers


class QuantizedLinear(nn.Module):
    """A weight-only quantized ``Linear`` (see the module for the packs and kernels);
    ``dequantize()`` is its float32 twin."""

    def __init__(self, scheme: str, in_features: int, out_features: int, group_size: int,
                 qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):
        super().__init__()
        if scheme not in SCHEMES:
            raise InfLLMLiteError(f"unknown quantization scheme {scheme!r}")
        self.scheme, self.in_features, self.out_features, self.group_size = scheme, in_features, out_features, group_size
        if scheme == "int8":  # (out, groups, G) like int4's; per-channel: one group
            qweight = qweight.reshape(out_features, in_features // group_size, group_size)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", offsets)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.kernel = "dequant"
        self.prefill_bf16 = False  # products over more than PREFILL_ROWS rows: the bf16 GEMM
        self._label = self._make_label()
        self.register_buffer("_kernel_weight", None, persistent=False)  # the packed kernel's copy
        self.register_buffer("_kernel_scales", None, persistent=False)
        self.register_buffer("_kernel_ones", None, persistent=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, scheme: str,
                   group_size: int | None) -> "QuantizedLinear":
        out, n = weight.shape
        if scheme == "int8":
            q, scales = quantize_int8(weight)
            return cls("int8", n, out, n, q, scales, None, bias)
        packed, scales, offsets = quantize_int4(weight, group_size)
        return cls("int4", n, out, group_size, packed, scales, offsets, bias)

    @property
    def label(self) -> str:
        """``scheme:kernel``, e.g. ``int4:packed-bf16``, ``int8/g32:dequant-f32``."""
        return self._label

    def _tag(self) -> str:
        return self.scheme if self.scheme == "int4" or self.group_size == self.in_features else f"int8/g{self.group_size}"

    def _make_label(self) -> str:
        return f"{self._tag()}:{'packed-bf16' if self.kernel == 'packed' else 'dequant-f32'}"

    def packable(self) -> bool:
        """Whether ATen's integer kernels take this pack (grouped int8: one call per group)."""
        if self.scheme == "int8":
            return True
        return self.out_features % 16 == 0 and self.in_features % 32 == 0

    def prepare(self, kernel: str | None = None, prefill: str | None = None) -> "QuantizedLinear":
        """Settle this layer's kernel (``None``: the process's choice for the scheme; the
        CPU only, other devices dequantize), its prefill kernel when packed (``bf16`` /
        ``float32``, None: the process's choice) and make the packed kernel's copy once."""
        on_cpu = self.qweight.device.type == "cpu"
        kernel = kernel or (quant_kernel(self.scheme) if on_cpu else "dequant")
        self.kernel = "packed" if kernel == "packed" and on_cpu and self.packable() else "dequant"
        self.prefill_bf16 = self.kernel == "packed" and (prefill or prefill_kernel(self.scheme)) == "bf16"
        self._label = self._make_label()
        self._kernel_weight = self._kernel_scales = self._kernel_ones = None
        if self.kernel == "packed":
            with torch.no_grad():
                if self.scheme == "int8" and self.qweight.shape[1] == 1:
                    self._kernel_scales = self.scales.reshape(-1).to(torch.bfloat16)
                elif self.scheme == "int8":  # grouped: the groups' weights side by side, (groups, out, G)
                    grouped = self.qweight.transpose(0, 1).contiguous()
                    self.qweight = grouped.transpose(0, 1)  # the same bytes, not a second copy
                    self._kernel_weight = grouped
                    self._kernel_scales = self.scales.float().T.contiguous()  # (groups, out)
                    self._kernel_ones = torch.ones(self.out_features, dtype=torch.bfloat16)
                else:  # ATen's int4: w = (q - 8) * s + z, z = o + 8 s, as (in/G, out, 2)
                    q = unpack_int4(self.qweight).to(torch.int32)
                    self._kernel_weight = torch._convert_weight_to_int4pack_for_cpu(q, 2)
                    s, o = self.scales.float(), self.offsets.float()
                    self._kernel_scales = torch.stack((s, o + 8 * s), -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return self

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The weight this layer stands for, (out, in)."""
        if self.scheme == "int8":
            return dequantize_int8(self.qweight, self.scales, dtype)
        return dequantize_int4(self.qweight, self.scales, self.offsets, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        prefill = self.prefill_bf16 and rows > PREFILL_ROWS
        label = f"{self._tag()}:dequant-bf16" if prefill else self._label
        if not torch.compiler.is_compiling() and label not in _used:
            _used[label] = None
        if prefill:
            y = self._dequantized(x, torch.bfloat16)
        elif self.kernel == "packed" and (self._kernel_ones is None or rows <= FEW_ROWS):
            y = self._packed(x)
        else:
            y = self._dequantized(x)
        return y if self.bias is None else y + self.bias

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xb = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self._kernel_ones is not None:  # grouped int8: a product per group, scaled in float32
            xg = xb.reshape(xb.shape[0], -1, self.group_size)
            y = torch.zeros(xb.shape[0], self.out_features, dtype=torch.float32, device=x.device)
            for g in range(xg.shape[1]):  # y += z · s in one op (the same bits as z.float() * s, then +=)
                y.addcmul_(torch._weight_int8pack_mm(xg[:, g].contiguous(), self._kernel_weight[g],
                                                     self._kernel_ones), self._kernel_scales[g])
        elif self.scheme == "int8":
            y = torch._weight_int8pack_mm(xb, self.qweight.reshape(self.out_features, -1), self._kernel_scales)
        else:
            y = torch._weight_int4pack_mm_for_cpu(xb, self._kernel_weight, self.group_size, self._kernel_scales)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _dequantized(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``F.linear`` on the weight dequantized a chunk of rows at a time, in ``dtype``
        (None: ``x``'s; bf16: the float32 dequantization rounded once, ``x`` rounded, the
        output returned in ``x``'s dtype)."""
        dtype = dtype or x.dtype
        xc = x.to(dtype)
        exact = torch.float32 if dtype != x.dtype else dtype  # the dequantization's arithmetic
        rows = max(16, CHUNK_ELEMENTS // self.in_features)
        per_channel = self.scheme == "int8" and self.group_size == self.in_features
        parts = []
        for r in range(0, self.out_features, rows):
            q, s = self.qweight[r:r + rows], self.scales[r:r + rows]
            if per_channel:  # the scale after the product: one multiply per output
                parts.append(F.linear(xc, q.reshape(q.shape[0], -1).to(dtype)).to(x.dtype) * s.reshape(-1).to(x.dtype))
                continue
            if self.scheme == "int8":
                w = dequantize_int8(q, s, exact)
            else:
                w = dequantize_int4(q, s, self.offsets[r:r + rows], exact)
            parts.append(F.linear(xc, w.to(dtype)).to(x.dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, scheme={self.scheme}, "
                f"group_size={self.group_size}, kernel={self.kernel}")


class QuantizedEmbedding(nn.Module):
    """An embedding table read from a :class:`QuantizedLinear`'s pack (a tied LM head's,
    or its own): the looked-up rows dequantized to float32, nothing else."""

    def __init__(self, table: QuantizedLinear):
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.table
        flat = ids.reshape(-1)
        if t.scheme == "int8":
            rows = dequantize_int8(t.qweight[flat], t.scales[flat])
        else:
            rows = dequantize_int4(t.qweight[flat], t.scales[flat], t.offsets[flat])
        return rows.reshape(*ids.shape, t.in_features)


def model_kernels(model: nn.Module) -> str:
    """The kernels of ``model``'s linear layers, e.g. ``int4:packed-bf16 x210, int8/g32:dequant-f32 x1``."""
    counts: dict[str, int] = {}
    for m in model.modules():
        label = m.label if isinstance(m, QuantizedLinear) else "float32" if isinstance(m, Linear) else None
        if label:
            counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in counts.items())


def weights_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (tied ones once), the kernels' copies included."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen and not t.is_meta:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def quantize_model(model: nn.Module, scheme: str, group_size: int | None = None, *, head: bool = True,
                   packs: dict | None = None, only_packs: bool = False, kernel: str | None = None) -> nn.Module:
    """Replace ``model``'s ``Linear`` layers in place by :class:`QuantizedLinear` ones
    (``head``: the LM head too; a tied embedding then reads the head's pack) and settle
    their kernel (``kernel``: None for the process's choice). ``packs``: module name ->
    ready :class:`QuantizedLinear` (GGUF blocks), used as they are (``only_packs``: the
    other layers stay float); ``packs["embed_tokens"]`` becomes the embedding.
    ``model.quantization`` records what was done (``int8``, ``int4/g32``, ``gguf``)."""
    packs = packs or {}
    tied = getattr(getattr(model, "args", None), "tie_word_embeddings", False)
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear) or (name == "lm_head" and not head):
            continue
        layer = packs.get(name)
        if layer is None:
            if only_packs:
                continue
            layer = QuantizedLinear.from_float(module.weight, module.bias, scheme, group_size)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.prepare(kernel))
    if "embed_tokens" in packs:
        model.embed_tokens = QuantizedEmbedding(packs["embed_tokens"])
    elif head and tied and isinstance(getattr(model, "lm_head", None), QuantizedLinear):
        model.embed_tokens = QuantizedEmbedding(model.lm_head)
    model.quantization = scheme if group_size is None else f"{scheme}/g{group_size}"
    return model
