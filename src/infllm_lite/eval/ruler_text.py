"""The texts RULER's generated tasks are built from, all local (no download):

* ``NOISE``: RULER's noise haystack sentence (the same words as InfiniteBench's passkey noise,
  :data:`.passkey.NOISE_SENTENCES`).
* ``essay_words()``: the stand-in for RULER's Paul Graham essays: the prose of the Python
  documentation that ships with Python itself (``pydoc_data.topics``, the help topics,
  in key order), whitespace collapsed, as a list of words. It is repeated when a haystack
  needs more words, as RULER repeats its essays.
* ``word_list()``: the stand-in for RULER's ``wonderwords`` noun/adjective/verb lists (no
  word-list package is installed here; ``nltk`` is, without its corpora): the distinct
  lower-case alphabetic words of 4 to 12 letters of the same ``pydoc_data.topics`` text,
  sorted (about 2,600 words).
"""

from __future__ import annotations

import re
from functools import lru_cache

from .passkey import NOISE_SENTENCES

NOISE = " ".join(NOISE_SENTENCES)  # "The grass is green. ... There and back again."


@lru_cache(maxsize=1)
def _topics_text() -> str:
    from pydoc_data.topics import topics
    return " ".join(topics[k] for k in sorted(topics))


@lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """The essay haystack as words (split on whitespace, as RULER splits its essays)."""
    return tuple(re.sub(r"\s+", " ", _topics_text()).strip().split(" "))


@lru_cache(maxsize=1)
def word_list() -> tuple[str, ...]:
    """Distinct lower-case words of 4 to 12 letters, sorted (deterministic)."""
    return tuple(sorted({w.lower() for w in re.findall(r"\b[A-Za-z]{4,12}\b", _topics_text())}))


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    """``text`` split after '.', '!' or '?' followed by a space (RULER uses nltk's
    ``sent_tokenize``, whose punkt data is not installed here)."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]
