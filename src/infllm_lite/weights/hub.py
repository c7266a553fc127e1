"""Resolve a model source: a local folder, a ``.gguf`` file, or a Hugging Face hub id."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import InfLLMLiteError

#: The files of a hub repository a model load needs (no .bin, no other formats).
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
]

_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


def parse_hub_id(source: str) -> tuple[str, str | None] | None:
    """``("owner/name", revision or None)`` if ``source`` looks like a hub id, else None."""
    m = _HUB_ID.fullmatch(source)
    if m is None or m["repo"].endswith((".", "-")) or ".." in m["repo"]:
        return None
    return m["repo"], m["revision"]


def resolve_source(source: str | os.PathLike) -> Path:
    """A local folder or .gguf file for ``source``, downloading hub ids."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return path
        raise InfLLMLiteError(f"{path} is a file but not a .gguf: pass a model folder, a .gguf file or a hub id")
    hub = parse_hub_id(os.fspath(source)) if isinstance(source, str) else None
    if hub is None:
        raise InfLLMLiteError(f"{source} does not exist")
    repo_id, revision = hub
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except Exception as e:  # network, not found, gated, offline: one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InfLLMLiteError(
            f"could not download {source} from the Hugging Face hub: {reason} "
            "(if you meant a local path, it does not exist)"
        ) from e
