"""llama.cpp (``llama-cpp-python``) on the embedded model's own GGUF file, as an outside
reference for the benchmarks; optional: ``make bench LLAMA_CPP=1`` installs
``llama-cpp-python`` (builds llama.cpp from source, about 6 minutes on 2 cores, without
AMX: these VMs report it and fault on it, "Illegal instruction"). It runs the GGUF as
stored (the embedded file is Q4_1, so it reads about 5x fewer weight bytes per token than
our float32 model) with its default float16 KV cache.
"""

from __future__ import annotations

import importlib.util
import time


LLAMA_CPP_MISSING = "llama.cpp: not installed (make bench LLAMA_CPP=1 installs it), left out"


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def load_llama_cpp(gguf_path, n_ctx: int, threads: int):
    """A ``llama_cpp.Llama`` over ``gguf_path`` with room for ``n_ctx`` tokens, on ``threads``
    threads for both prefill and decode; only the last position's logits are kept."""
    from llama_cpp import Llama
    return Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                 logits_all=False, verbose=False)


def _last_logits(llm):
    """The logits of the last token ``llm`` evaluated, (vocab,) float32 (a view)."""
    import llama_cpp
    import numpy as np
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def run_llama_cpp(llm, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """Greedy generation from ``ids`` with an empty KV cache: (seconds to the first new token,
    seconds for the next ``new_tokens``), as ``scaling.run_transformers`` measures them."""
    llm.reset()  # forget the previous run's tokens; eval clears their KV entries
    start = time.perf_counter()
    llm.eval(ids)
    token = int(_last_logits(llm).argmax())
    first = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([token])
        token = int(_last_logits(llm).argmax())
    return first - start, time.perf_counter() - first
