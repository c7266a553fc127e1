"""The OpenAI wire format: request bodies (checked with pydantic, each refusal naming its
field), the error body ``{"error": {"message", "type", "param", "code"}}`` with its HTTP
status, and the response and stream-chunk objects.

Extensions beyond OpenAI's fields (documented in README's "Serving"): ``attention``
(``full`` | ``streaming`` | ``infllm``) and ``memory`` (``MemoryConfig`` fields) on
completions and chat requests, ``conversation_id`` on chat requests.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..options import ATTENTION_MODES, CACHE_POLICIES, KV_DTYPES


class APIError(Exception):
    """An error answered as OpenAI does: ``status`` and the ``error`` object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# Per-request memory settings: what the attention reads, never where it lives (the offload
# folder and the host budget are the server's, from its command line).
MemoryField = Union[int, None]


class MemoryOverrides(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_init: MemoryField = None
    n_local: MemoryField = None
    block_size: MemoryField = None
    topk: MemoryField = None
    repr_topk: MemoryField = None
    exc_block_size: MemoryField = None
    max_cached_blocks: MemoryField = None
    cache_policy: Literal[CACHE_POLICIES] | None = None  # type: ignore[valid-type]
    score_decay: float | None = None
    chunk_size: MemoryField = None
    kv_dtype: Literal[KV_DTYPES] | None = None  # type: ignore[valid-type]

    def given(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if v is not None}


FULL_MEMORY = ("full attention's memory takes only kv_dtype (how its KV cache is stored); {} "
               "apply to the modes with a context memory (streaming, lm-infinite, infllm)")


class Extensions(BaseModel):
    attention: Literal[ATTENTION_MODES] | None = None  # type: ignore[valid-type]
    memory: MemoryOverrides | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI fields this server does not implement: refused unless at their default
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
               "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "response_format": (None, {"type": "text"}), "best_of": (None, 1), "echo": (None, False),
               "suffix": (None, "")}


class Sampling(Extensions):
    """The fields completions and chat share. Unknown fields are ignored (clients send
    their own); supported-looking ones we do not implement are refused when set."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None

    def check(self) -> None:
        for name, allowed in UNSUPPORTED.items():
            if name in (self.model_extra or {}) and self.model_extra[name] not in allowed:
                raise bad_request(f"{name} is not supported by this server", param=name, code="unsupported_parameter")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad_request(f"max_tokens must be at least 1, got {self.max_tokens}", param="max_tokens")
        stops = self.stops()
        if len(stops) > 4 or any(not s for s in stops):
            raise bad_request("stop takes up to 4 non-empty strings", param="stop")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template(self) -> dict:
        """The message as the chat template reads it (text parts joined; developer is system)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    conversation_id: str | None = None

    def check(self) -> None:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        super().check()


class ConversationCreate(Extensions):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    system: str | None = None


def parse(model: type[BaseModel], raw: bytes):
    """The request body as ``model``, or the 400 that names what is wrong."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    try:
        parsed = model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        if first["type"] == "missing":
            raise bad_request(f"'{loc}' is a required property", param=loc, code="missing_required_parameter") from None
        raise bad_request(f"invalid value for '{loc}': {first['msg']}", param=loc or None,
                          code="invalid_value") from None
    check = getattr(parsed, "check", None)
    if check is not None:
        check()
    return parsed


# ---------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish_reason: str | None, chat: bool, delta: bool = False,
                      first: bool = False) -> dict:
    """One choice of a response (or with ``delta`` of a stream chunk)."""
    if not chat:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if delta:
        content = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": index, "delta": content, "logprobs": None, "finish_reason": finish_reason}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}


def envelope(response_id: str, model: str, chat: bool, choices: list[dict], *, chunk: bool = False,
             extra: dict | None = None) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {"id": response_id, "object": kind, "created": int(time.time()), "model": model,
            "choices": choices, **(extra or {})}


def sse(data: dict | str) -> str:
    """One Server-Sent Event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
