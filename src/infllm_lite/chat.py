"""``ChatSession``: a conversation whose whole history stays in the attention memory. Each
turn reads only its new tokens (the chat template's text for the new message, after what
the memory has already read), then answers; the memory can be saved to a snapshot and
loaded in another process. Runnable as written (tests/test_readme.py runs it):

    from pathlib import Path
    from infllm_lite import ChatSession, load_model
    model, tokenizer = load_model()
    repeat = 200                                      # about 3.5K tokens; README_TEST: 40
    Path("report.txt").write_text(                    # a stand-in for your long document
        "The harbour of Brenn freezes every January and the ferries stop for six weeks. " * repeat
        + "The report concludes that a second pier on the sheltered south shore would keep them running.")
    session = ChatSession(model, tokenizer, attention="infllm", system="Be brief.", max_new_tokens=40)
    session.read(open("report.txt").read())           # a long document, read once
    print(session.send("What does the report conclude?"))
    session.save("report.snap")
    later = ChatSession.load("report.snap", model, tokenizer, max_new_tokens=40)
    for piece in later.send("Where should the new pier go?", stream=True): print(piece, end="")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch

from .attention import make_attention_state
from .errors import InfLLMLiteError
from .generate import continue_ids, read_ids, stop_token_ids, stream_text
from .memory_config import MemoryConfig, memory_estimate
from .options import DEFAULT_CHUNK_SIZE
from .sampling import check_sampling
from .snapshot import load_snapshot, read_header, save_snapshot
from .stats import GenerationStats

DOCUMENT_PREFIX = "Read this document; I will ask you about it.\n\n"


class ChatSession:
    """A chat with ``model`` that keeps every turn in its attention memory.

    ``attention``: ``infllm`` (default: unbounded), ``streaming``, or ``full`` (holds at
    most ``capacity`` tokens, default the model's native window). ``memory`` configures the
    first two (default: ``MemoryConfig.for_model``); with ``full`` only its ``kv_dtype``
    applies (the cache's dtype). Sampling as in :func:`generate`.
    """

    def __init__(self, model, tokenizer, *, attention: str = "infllm",
                 memory: MemoryConfig | None = None, system: str | None = None,
                 max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, kernel: str = "auto",
                 capacity: int | None = None):
        check_sampling(temperature, top_p, top_k)
        if max_new_tokens < 1:
            raise InfLLMLiteError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.model, self.tokenizer = model, tokenizer
        self.attention, self.kernel, self.system = attention, kernel, system
        self.memory = memory if attention == "full" else (memory or MemoryConfig.for_model(model.args))
        self.capacity = capacity or model.args.max_position_embeddings
        self.max_new_tokens = max_new_tokens
        self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, generator=None)
        if seed is not None:
            device = next(model.parameters()).device
            self.sampling["generator"] = torch.Generator(device=device).manual_seed(seed)
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.last_stats: GenerationStats | None = None
        self._stop_requested = False
        self.reset()

    # ------------------------------------------------------------------ conversation
    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        if getattr(self, "state", None) is not None:
            self.state.close()
        param = next(self.model.parameters())
        self.state = make_attention_state(self.attention, self.model.args, capacity=self.capacity,
                                          memory=self.memory, dtype=param.dtype, device=param.device,
                                          kernel=self.kernel)
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.tokens: list[int] = []  # every token the memory has read
        self._text = ""  # the text of those tokens (as the chat template rendered it)
        self._rendered = ""

    def read(self, document: str, *, progress: bool = True) -> int:
        """Read a document into the memory as a user message, without answering; returns the
        number of tokens read. Questions about it follow with :meth:`send`."""
        if not document.strip():
            raise InfLLMLiteError("the document is empty")
        self.messages.append({"role": "user", "content": DOCUMENT_PREFIX + document})
        new = self._new_tokens(add_generation_prompt=False)
        self._check_room(len(new))
        read_ids(self.model, self.state, new, chunk_size=self._chunk(), progress=progress,
                 desc="reading the document")
        self._record(new)
        return len(new)

    def send(self, text: str, *, stream: bool = False, progress: bool = False) -> str | Iterator[str]:
        """Add a user message and answer it (a string, or with ``stream=True`` an iterator
        of text pieces). Only the new message's tokens are read."""
        if not text.strip():
            raise InfLLMLiteError("the message is empty")
        self.messages.append({"role": "user", "content": text})
        new = self._new_tokens(add_generation_prompt=True)
        self._check_room(len(new) + self.max_new_tokens)
        pieces = self._answer(new, progress)
        return pieces if stream else "".join(pieces)

    def stop(self) -> None:
        """Ask the answer being streamed to end after its current token (e.g. on Ctrl-C):
        the memory stays consistent and the partial answer is kept."""
        self._stop_requested = True

    @property
    def stopped(self) -> bool:
        """Whether the last answer was ended by :meth:`stop`."""
        return self._stop_requested

    def _answer(self, new: list[int], progress: bool) -> Iterator[str]:
        self._stop_requested = False
        self.last_stats = GenerationStats()
        before = self.state.length
        generated: list[int] = []

        def tokens() -> Iterator[int]:  # the answer's tokens, recorded, until stop() is asked
            for token in continue_ids(self.model, self.state, new, max_new_tokens=self.max_new_tokens,
                                      sampling=self.sampling, stop_token_ids=self.stop_ids,
                                      chunk_size=self._chunk(), progress=progress, stats=self.last_stats):
                generated.append(token)
                yield token
                if self._stop_requested:
                    return

        try:
            yield from stream_text(self.tokenizer, tokens())
        finally:  # also when the caller stops iterating: record what the memory has read
            fed = self.state.length - before - len(new)  # the generated tokens fed back
            reply = self.tokenizer.decode(generated, skip_special_tokens=True)
            self.messages.append({"role": "assistant", "content": reply})
            self._record(new, generated[:fed])
            self.last_stats.memory = self.state.stats()

    # ------------------------------------------------------------------ bookkeeping
    def _new_tokens(self, add_generation_prompt: bool) -> list[int]:
        """Tokens of the conversation's text after what the memory has read. When the chat
        template re-renders earlier turns differently (some trim replies), the text after
        the longest common prefix is read."""
        text = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=add_generation_prompt)
        common = len(os.path.commonprefix([self._text, text]))
        self._rendered = text
        return self.tokenizer.encode(text[common:], add_special_tokens=False)

    def _record(self, ids: list[int], generated: list[int] = ()) -> None:
        """The memory has read ``ids`` (the rendered turn's new tokens) and ``generated``."""
        self.tokens += list(ids) + list(generated)
        self._text = self._rendered + self.tokenizer.decode(generated, skip_special_tokens=False)

    def _check_room(self, n: int) -> None:
        if self.attention == "full" and self.state.length + n > self.capacity:
            self.messages.pop()
            raise InfLLMLiteError(
                f"full attention holds {self.capacity} tokens; {self.state.length} are used and this "
                f"turn needs {n} more. Use attention='infllm' for long conversations, or reset")

    def _chunk(self) -> int:
        return self.memory.chunk_size if self.memory is not None else DEFAULT_CHUNK_SIZE

    def stats(self) -> dict:
        """Tokens in memory, turns, and for infllm the blocks per tier and the bytes held."""
        out = {"tokens": self.state.length, "messages": len(self.messages), "attention": self.attention}
        pool = self.state.stats()  # None without a block pool
        if pool is not None:
            out.update(blocks=pool.blocks, blocks_fast=pool.blocks_fast, blocks_host=pool.blocks_host,
                       blocks_disk=pool.blocks_disk, hit_rate=pool.hit_rate,
                       bytes=memory_estimate(self.model.args, self.memory, self.state.length)["total"])
        else:
            a = self.model.args
            kept = self.state.length if self.attention == "full" else min(
                self.state.length, self.memory.n_init + self.memory.n_local)
            out["bytes"] = 2 * a.n_layers * a.n_kv_heads * a.head_dim * kept * next(
                self.model.parameters()).element_size()
        return out

    # ------------------------------------------------------------------ snapshots
    def save(self, path: str | Path) -> Path:
        """Save the memory, the token history and the conversation to a snapshot file."""
        extra = {"messages": self.messages, "system": self.system, "text": self._text,
                 "capacity": self.capacity}
        return save_snapshot(path, self.state, model=self.model, mode=self.attention, memory=self.memory,
                             tokens=self.tokens, extra=extra)

    @classmethod
    def load(cls, path: str | Path, model, tokenizer, *, memory: MemoryConfig | None = None,
             **options) -> "ChatSession":
        """A session continuing the one saved at ``path`` (same model; ``memory`` may change
        only placement options). ``options``: sampling and ``max_new_tokens`` for what follows."""
        kernel = options.pop("kernel", "auto")
        capacity = options.pop("capacity", None) or read_header(path)["extra"].get("capacity")
        snap = load_snapshot(path, model, memory=memory, kernel=kernel, capacity=capacity)
        saved = snap.extra
        if "messages" not in saved:
            raise InfLLMLiteError(f"{path} is a memory snapshot but not a chat's (no conversation in it)")
        session = cls(model, tokenizer, attention=snap.mode, memory=snap.memory, system=saved.get("system"),
                      kernel=kernel, capacity=capacity, **options)
        session.state.close()
        session.state, session.tokens = snap.state, snap.tokens
        session.messages, session._text = saved["messages"], saved["text"]
        return session
