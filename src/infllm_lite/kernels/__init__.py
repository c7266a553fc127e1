"""Triton kernels, each with a plain-torch twin of the same signature and a dispatcher
(Triton for CUDA tensors when triton imports, else the twin). Without triton the package
still imports and the dispatchers use the twins.

This module holds what the kernels share: whether triton imports, and the launch mode.
Triton (3.9) reads TRITON_INTERPRET when it decorates a function: its own ``tl.sum``,
``tl.max``, ``tl.zeros`` when triton is first imported, so the mode is fixed by the
variable at that first ``import triton``. Our kernels are decorated at their first launch
in each mode (so importing this package early is harmless) and a launch whose mode
disagrees with triton's import raises InfLLMLiteError. ``TRITON_INTERPRET=1`` runs the
kernels on CPU tensors, in triton's interpreter.

Import the kernels from their modules (``from infllm_lite.kernels.block_relevance import
select_blocks``): the package re-exports nothing, so the module ``representative_scores``
is not shadowed by its function.
"""

from __future__ import annotations

import torch

from infllm_lite.errors import InfLLMLiteError

try:
    import triton
    import triton.language as tl
    from triton.runtime import JITFunction
except ImportError:  # no triton on this machine: the torch twins serve
    triton = tl = JITFunction = None


def on_triton(*tensors: torch.Tensor) -> bool:
    """The dispatchers' rule: Triton when triton imports and every tensor is on CUDA."""
    return triton is not None and all(t.is_cuda for t in tensors)


def triton_state() -> str:
    """``missing`` (triton does not import), ``interpret`` or ``compile`` (TRITON_INTERPRET
    now, agreeing with triton's import), or ``mixed`` (it changed since triton's import)."""
    if triton is None:
        return "missing"
    interpret = bool(triton.knobs.runtime.interpret)
    imported_interpreting = not isinstance(tl.sum, JITFunction)
    if interpret != imported_interpreting:
        return "mixed"
    return "interpret" if interpret else "compile"


def launch_mode(device: torch.device, who: str) -> bool:
    """True to interpret, False to compile, a launch of ``who`` on ``device``; raises
    InfLLMLiteError when Triton cannot run there."""
    state = triton_state()
    if state == "missing":
        raise InfLLMLiteError(f"{who}: triton is not installed")
    if state == "mixed":
        now = "1" if triton.knobs.runtime.interpret else "0"
        raise InfLLMLiteError(f"{who}: TRITON_INTERPRET={now} now, but triton was imported with the other "
                              "mode; set TRITON_INTERPRET before the first `import triton`")
    if state == "compile" and device.type != "cuda":
        raise InfLLMLiteError(f"{who}: tensors on {device}; Triton needs CUDA, or TRITON_INTERPRET=1 "
                              "set before the first `import triton`")
    return state == "interpret"


_JITTED: dict[tuple[object, bool], object] = {}


def jitted(fn, interpret: bool):
    """``fn`` decorated with ``triton.jit`` in the given mode (once per mode)."""
    if (fn, interpret) not in _JITTED:
        _JITTED[fn, interpret] = triton.jit(fn)  # reads TRITON_INTERPRET, which now says `interpret`
    return _JITTED[fn, interpret]
