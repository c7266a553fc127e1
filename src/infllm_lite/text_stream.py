"""Token ids → text as it becomes final, cut at stop strings: one ``TextStream`` per
answer, shared by ``generate``, ``ChatSession`` and the batching engine."""

from __future__ import annotations

from typing import Iterator, Sequence

from .tokenizer import Tokenizer


class StopStrings:
    """Cuts generated text at the first stop string; holds back what may start one."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.emitted = 0

    def push(self, piece: str) -> tuple[str, bool]:
        """Add decoded text; return (text now safe to show, whether a stop string was hit)."""
        search_from = max(0, len(self.text) - self.hold)
        self.text += piece
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            out, self.emitted = self.text[self.emitted:min(hits)], len(self.text)
            return out, True
        safe_end = max(self.emitted, len(self.text) - self.hold)
        out, self.emitted = self.text[self.emitted:safe_end], safe_end
        return out, False

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out


class TextStream:
    """One answer's text: :meth:`add` a token id, get the text it makes final (never half a
    UTF-8 character, special tokens skipped) and whether a stop string was hit (the text
    is cut before it); :meth:`finish` gives what was held back at the end."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self._decoder = tokenizer.incremental_decoder(skip_special_tokens=True)
        self._cutter = StopStrings(stop)
        self.stopped = False  # a stop string was hit: nothing more is shown

    def add(self, token_id: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        piece, self.stopped = self._cutter.push(self._decoder.add(token_id))
        return piece, self.stopped

    def finish(self) -> str:
        """The rest of the text once no more tokens come."""
        if self.stopped:
            return ""
        piece, self.stopped = self._cutter.push(self._decoder.flush())
        return piece if self.stopped else piece + self._cutter.flush()


def stream_text(tokenizer: Tokenizer, token_ids: Iterator[int], stop: Sequence[str] = ()) -> Iterator[str]:
    """Text pieces of ``token_ids`` as they become final, cut before the first ``stop``
    string; stops pulling tokens there."""
    text = TextStream(tokenizer, stop)
    for token_id in token_ids:
        piece, hit = text.add(token_id)
        if piece:
            yield piece
        if hit:
            return
    rest = text.finish()
    if rest:
        yield rest
