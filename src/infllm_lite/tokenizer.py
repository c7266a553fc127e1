"""Tokenizer: a small wrapper over ``tokenizers.Tokenizer`` for a Hugging Face model folder.

Reads ``tokenizer.json`` (+ ``tokenizer_config.json``, ``chat_template.jinja``,
``special_tokens_map.json``, ``generation_config.json``, ``config.json``), encodes and decodes
exactly as ``transformers`` does, renders chat templates in the same Jinja environment, and
decodes generated ids incrementally without splitting multi-byte characters.
"""

from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from infllm_lite.errors import InfLLMLiteError

__all__ = ["Tokenizer", "IncrementalDecoder"]

# The named special tokens transformers passes to chat templates (``special_tokens_map``).
_SPECIAL_TOKEN_KEYS = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)
# End-of-turn tokens used when the template's own end-of-turn token cannot be detected.
_KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>")
_REPLACEMENT = "\ufffd"


class Tokenizer:
    """Encode, decode and chat-format text for one model (see :meth:`from_dir`)."""

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        *,
        special_tokens: dict[str, str] | None = None,
        chat_templates: dict[str, str] | None = None,
        extra_eos_ids: Iterable[int] = (),
        name: str = "tokenizer",
    ) -> None:
        self._tok = tokenizer
        self._name = name
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self._templates: dict[str, str] = dict(chat_templates or {})
        self.chat_template: str | None = self._templates.get("default")
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.pad_token = self.special_tokens.get("pad_token")
        self.unk_token = self.special_tokens.get("unk_token")
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.pad_token_id = self.token_to_id(self.pad_token)
        added = tokenizer.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        # SentencePiece byte-fallback tokens: "<0xE4>" ... (decoded as one group of bytes)
        self._byte_ids = frozenset(
            i for b in range(256) if (i := tokenizer.token_to_id(f"<0x{b:02X}>")) is not None
        )
        self.stop_token_ids: set[int] = set(extra_eos_ids)
        if self.eos_token_id is not None:
            self.stop_token_ids.add(self.eos_token_id)
        self.stop_token_ids |= self._end_of_turn_ids()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dir(cls, folder: str | Path) -> "Tokenizer":
        """Load the tokenizer of a Hugging Face model folder."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InfLLMLiteError(f"{folder} is not a directory")
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise InfLLMLiteError(f"{folder} has no tokenizer.json")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception
            raise InfLLMLiteError(f"{path} is not a valid tokenizer.json: {e}") from None

        config = _read_json(folder / "tokenizer_config.json")
        special = {k: _token_str(config.get(k)) for k in _SPECIAL_TOKEN_KEYS}
        if "added_tokens_decoder" not in config:  # legacy folders: the map overrides (as in transformers)
            for k, v in _read_json(folder / "special_tokens_map.json").items():
                if k in _SPECIAL_TOKEN_KEYS:
                    special[k] = _token_str(v)
        special = {k: v for k, v in special.items() if v is not None}

        templates = _templates_from_config(config.get("chat_template"), folder)
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():  # takes priority over tokenizer_config.json, as in transformers
            templates["default"] = jinja_file.read_text(encoding="utf-8")

        eos_ids: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            value = _read_json(folder / name).get("eos_token_id")
            values = value if isinstance(value, list) else [value]
            eos_ids |= {v for v in values if isinstance(v, int) and not isinstance(v, bool)}
        return cls(tok, special_tokens=special, chat_templates=templates, extra_eos_ids=eos_ids,
                   name=str(folder))

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the post-processor (e.g. BOS)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (invalid UTF-8 becomes U+FFFD)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str | None) -> int | None:
        """Id of the token string ``token`` (None when unknown or None)."""
        return None if token is None else self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of ``token_id`` (None when out of range)."""
        return self._tok.id_to_token(token_id)

    def incremental_decoder(self, *, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        """A decoder for streaming generated ids one at a time."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render ``messages`` with the chat template, as ``transformers`` does (``tokenize=False``).

        Extra keyword arguments (``tools=...``, ``enable_thinking=...``) reach the template.
        """
        if not self._templates:
            raise InfLLMLiteError(f"{self._name} has no chat template; pass a plain string prompt")
        messages = _validate_messages(messages)
        if kwargs.get("tools") is not None and "tool_use" in self._templates:
            source = self._templates["tool_use"]
        elif self.chat_template is not None:
            source = self.chat_template
        else:
            raise InfLLMLiteError(
                f"{self._name} has several chat templates but none named 'default' "
                f"(found {sorted(self._templates)})"
            )
        variables = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        try:
            template = _compile(source)
        except jinja2.TemplateSyntaxError as e:
            raise InfLLMLiteError(
                f"chat template of {self._name} has a syntax error (line {e.lineno}): {e.message}"
            ) from None
        try:
            return template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except _TemplateRaised as e:
            raise InfLLMLiteError(f"chat template error: {e.message}") from None
        except Exception as e:  # the template is data: any failure inside it is the checkpoint's
            raise InfLLMLiteError(
                f"chat template of {self._name} failed: {type(e).__name__}: {e}"
            ) from None

    def _end_of_turn_ids(self) -> set[int]:
        """The special token the chat template writes after an assistant message, if any."""
        if self.chat_template is None:
            return set()
        marker = "InfLLMLiteEndOfTurnProbe"
        try:
            text = self.apply_chat_template(
                [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}],
                add_generation_prompt=False,
            )
        except InfLLMLiteError:
            text = ""
        if marker in text:
            tail = text[text.rindex(marker) + len(marker):].lstrip()
            ids = self.encode(tail, add_special_tokens=False)[:1]
            if ids and ids[0] in self._special_ids:
                return {ids[0]}
        known = {self.token_to_id(n) for n in _KNOWN_END_OF_TURN}
        return {i for i in known if i in self._special_ids}


class IncrementalDecoder:
    """Turns ids into text pieces as they arrive, never splitting a UTF-8 character.

    The pieces returned by :meth:`add`, followed by :meth:`flush`, concatenate to
    ``tokenizer.decode(all_ids, skip_special_tokens=...)``. Each step decodes only a short
    window: ``ids[prefix:read]`` (already emitted, decoded for context) and ``ids[prefix:]``;
    the new text is the difference. Text is held back while it ends in U+FFFD (an incomplete
    character) or in a byte-fallback token ("<0xE4>": the decoder turns a whole run of them
    into U+FFFDs if the run ends invalid). The window start only moves past text that decodes
    to something non-empty, so decoders that strip the first token's leading space
    (SentencePiece ``Metaspace`` / ``Strip``) affect only the context part.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids[:read] have been emitted
        self._prefix_text = ""  # decode(ids[prefix:read])
        self._in_byte_run = False  # the last visible token is a byte-fallback token

    def _decode(self, start: int) -> str:
        return self._tokenizer.decode(self._ids[start:], skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Append one id; return the text it completes ("" while a character is incomplete)."""
        token_id = int(token_id)
        self._ids.append(token_id)
        if not (self._skip and token_id in self._tokenizer._special_ids):  # skipped ids are invisible
            self._in_byte_run = token_id in self._tokenizer._byte_ids
        if self._in_byte_run:
            return ""
        text = self._decode(self._prefix)
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT):
            return ""
        if not text.startswith(self._prefix_text):  # a decoder that rewrote earlier text: wait
            return ""
        piece = text[len(self._prefix_text):]
        context = self._decode(self._read)
        if context:  # the window may start here: its first token has visible text
            self._prefix, self._prefix_text = self._read, context
        else:
            self._prefix_text = text
        self._read = len(self._ids)
        return piece

    def flush(self) -> str:
        """Return the text still held back (e.g. an incomplete character): call at the end of a stream."""
        text = self._decode(self._prefix)
        # Past a rewrite (see add) exactness is lost: emit what follows the common prefix.
        keep = len(os.path.commonprefix([text, self._prefix_text]))
        self._prefix_text, self._read = text, len(self._ids)
        return text[keep:]


# ---------------------------------------------------------------------- helpers
def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InfLLMLiteError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InfLLMLiteError(f"{path} should hold a JSON object, got {type(data).__name__}")
    return data


def _token_str(value: Any) -> str | None:
    """A special token from a config: a string or an AddedToken dict (``{"content": ...}``)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _templates_from_config(value: Any, folder: Path) -> dict[str, str]:
    """``chat_template`` from tokenizer_config.json: a string, or a list of {name, template}."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
        for t in value
    ):
        return {t["name"]: t["template"] for t in value}
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return dict(value)
    raise InfLLMLiteError(
        f"{folder}/tokenizer_config.json: chat_template should be a string or a list of "
        "{name, template} objects"
    )


def _validate_messages(messages: Any) -> list[dict]:
    """Check ``messages`` is a non-empty list of {role, content} dicts; drop None-valued keys."""
    if not isinstance(messages, (list, tuple)):
        raise InfLLMLiteError(f"messages should be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise InfLLMLiteError("messages is empty; pass at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            shown = repr(m)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise InfLLMLiteError(
                f"messages[{i}] should be a dict with string 'role' and 'content', got {shown}"
            )
        out.append({k: v for k, v in m.items() if v is not None})
    return out


class _TemplateRaised(jinja2.TemplateError):
    """Raised by the template's own ``raise_exception(message)``."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Unlike Jinja's tojson, no HTML escaping (as in transformers).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict(...)`` for templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore-prefixed attributes (as in transformers)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (same trick as jinja's Namespace)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore-prefixed attributes ({name!r})"
            )


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (used for assistant masks) and render its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


@functools.lru_cache(maxsize=None)
def _env() -> ImmutableSandboxedEnvironment:
    """The Jinja environment transformers renders chat templates in."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_TemplateDict(), namespace=_TemplateNamespace)
    return env


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    """Compile (and cache) a chat template."""
    return _env().from_string(source)
