"""The prompts ``infllm-lite generate`` reads from files, all checked before the model
loads: a UTF-8 text file is one prompt; a jsonl file holds one prompt per line,
``{"prompt": TEXT}`` or ``{"messages": [...]}``, optionally with an ``"id"`` (other keys
are ignored). A bad file or line is one ``InfLLMLiteError`` naming the file (and line)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import InfLLMLiteError
from .eval.files import read_jsonl


@dataclass(frozen=True)
class PromptEntry:
    """One prompt of the command line: ``text`` (a raw prompt, or with ``--chat`` the user's
    message) or ``messages`` (a whole conversation, used as given); ``name`` is what names
    it in the output (a jsonl ``id``, a prompt file's path), None when only its index does."""

    text: str | None = None
    messages: tuple[dict, ...] | None = None
    name: str | int | None = None


def _check_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise InfLLMLiteError(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise InfLLMLiteError(f"{what} {path} does not exist")


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``, or one line saying why not (``what`` names the file)."""
    path = Path(path)
    _check_file(path, what)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InfLLMLiteError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise InfLLMLiteError(f"{what} {path}: cannot read it ({e.strerror or e})") from None


def read_prompt_file(path: Path) -> PromptEntry:
    """A text file holding one prompt, named by its path as given."""
    text = read_text_file(path, "prompt file")
    if not text.strip():
        raise InfLLMLiteError(f"prompt file {path} is empty")
    return PromptEntry(text=text, name=str(path))


def read_prompts_jsonl(path: Path) -> list[PromptEntry]:
    """Every line of a prompts jsonl file (blank lines skipped), each checked."""
    path = Path(path)
    _check_file(path, "prompts file")
    entries = []
    try:
        for index, record in read_jsonl(path):
            entries.append(_entry(record, f"{path}, line {index + 1}"))
    except UnicodeDecodeError:
        raise InfLLMLiteError(f"prompts file {path} is not UTF-8 text (after {len(entries)} "
                              "good prompts)") from None
    except OSError as e:
        raise InfLLMLiteError(f"prompts file {path}: cannot read it ({e.strerror or e})") from None
    if not entries:
        raise InfLLMLiteError(f"prompts file {path} holds no prompts (one JSON object per line: "
                              '{"prompt": "..."} or {"messages": [...]})')
    return entries


def _entry(record: dict, where: str) -> PromptEntry:
    has_prompt, has_messages = "prompt" in record, "messages" in record
    if has_prompt == has_messages:
        raise InfLLMLiteError(f'{where}: needs "prompt" (a text) or "messages" (a chat), '
                              f"{'not both' if has_prompt else 'found neither'}")
    name = record.get("id")
    if name is not None and (isinstance(name, bool) or not isinstance(name, (str, int))):
        raise InfLLMLiteError(f'{where}: "id" must be a string or an integer, got {name!r}')
    if has_prompt:
        text = record["prompt"]
        if not isinstance(text, str):
            raise InfLLMLiteError(f'{where}: "prompt" must be a string, got {type(text).__name__}')
        if not text.strip():
            raise InfLLMLiteError(f'{where}: "prompt" is empty')
        return PromptEntry(text=text, name=name)
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise InfLLMLiteError(f'{where}: "messages" must be a non-empty list of '
                              '{"role": ..., "content": ...} objects')
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            shown = repr(m) if len(repr(m)) <= 60 else repr(m)[:57] + "..."
            raise InfLLMLiteError(f'{where}: message {i} is not a {{"role": TEXT, "content": TEXT}} '
                                  f"object: {shown}")
    return PromptEntry(messages=tuple(messages), name=name)
