"""The eval's file handling: jsonl read line by line (a bad line named by file and line),
text written atomically, and a file that cannot be written as one clear error naming it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InfLLMLiteError


def read_jsonl(path: Path, *, torn_tail: bool = False, advice: str = "") -> Iterator[tuple[int, dict]]:
    """``(line index, record)`` for each non-blank line, every record a JSON object; a bad
    line raises an error naming the file and line (and ``advice``). ``torn_tail``: a last
    line without its newline that is not JSON (a writer killed mid-line) is dropped."""
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            where = f"{path}, line {index + 1}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if torn_tail and not line.endswith("\n"):
                    return
                raise InfLLMLiteError(f"{where}: not valid JSON ({e.msg}, column {e.colno})"
                                      f"{advice}") from None
            if not isinstance(record, dict):
                raise InfLLMLiteError(f"{where}: expected a JSON object, got "
                                      f"{type(record).__name__}{advice}")
            yield index, record


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OSError while writing ``path`` (a file or a folder) into one line naming it."""
    try:
        yield
    except OSError as e:
        raise InfLLMLiteError(f"cannot write {path}: {e.strerror or e}") from None


def write_atomic(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file beside it (never half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with writing(path):
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
