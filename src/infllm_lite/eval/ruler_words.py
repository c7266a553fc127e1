"""RULER's aggregation tasks (see :mod:`.ruler`): cwe (the 10 most common words of a
numbered list) and fwe (the 3 most frequent coded words of a Zipf-distributed text)."""

from __future__ import annotations

import math
import random
import string
from functools import lru_cache

from ..errors import InfLLMLiteError
from ..tokenizer import Tokenizer
from .ruler_prompt import MAX_NEW_TOKENS, TEMPLATES, fit, sample_of
from .ruler_text import word_list
from .sample import EvalSample

@lru_cache(maxsize=1)
def _word_pairs() -> tuple[str, ...]:
    """Hyphenated pairs of the word list's first 200 words: the words past the list's end
    (RULER switches to a larger list there)."""
    words = word_list()[:200]
    return tuple(f"{a}-{b}" for a in words for b in words if a != b)


def _cwe_example(rng: random.Random, num_words: int, common: int, uncommon: int,
                 n_common: int = 10) -> tuple[str, list[str]]:
    words = list(word_list())
    if num_words <= len(words):
        chosen = rng.sample(words, num_words)
    else:  # every word, then pairs (so a prompt grows smoothly past the list's end)
        extra = num_words - len(words)
        if extra > len(_word_pairs()):
            raise InfLLMLiteError(f"cwe needs {num_words} distinct words; the word list and "
                                  f"its pairs have {len(words) + len(_word_pairs())}")
        chosen = words + rng.sample(_word_pairs(), extra)
        rng.shuffle(chosen)
    top, rest = chosen[:n_common], chosen[n_common:]
    listed = top * common + rest * uncommon
    rng.shuffle(listed)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), top


def make_cwe_sample(tokenizer: Tokenizer, n_tokens: int, depth: float, seed: int) -> EvalSample:
    """10 words 30 times each, the others 3 times (below 4K tokens: 6 and 1), after one
    worked example, as RULER's cwe."""
    template, prefix = TEMPLATES["common_words_extraction"]
    short = n_tokens < 4096
    shot_sizes, main_sizes = ((20, 3, 1), (6, 1)) if short else ((40, 10, 3), (30, 3))

    def build(n: int):
        rng = random.Random(f"cwe/{seed}")
        shot_context, shot_top = _cwe_example(rng, *shot_sizes)
        shot = (template.format(context=shot_context) + prefix + " "
                + " ".join(f"{i + 1}. {w}" for i, w in enumerate(shot_top)))
        context, top = _cwe_example(rng, n, *main_sizes)
        return shot + "\n" + template.format(context=context), prefix, dict(top=top)

    fitted = fit("cwe", tokenizer, n_tokens, build, start=10)
    return sample_of("cwe", fitted, fitted.extra["top"], n_tokens, depth, seed)


ZETA_2 = math.pi ** 2 / 6  # zeta(alpha) for RULER's alpha = 2


def make_fwe_sample(tokenizer: Tokenizer, n_tokens: int, depth: float, seed: int) -> EvalSample:
    """Coded 6-letter words drawn with Zipf's law (alpha 2), the most frequent one "...":
    the answer is the next three (RULER's fwe; vocabulary: a word per 50 tokens)."""
    rng = random.Random(f"fwe/{seed}")
    vocab_size = max(4, (n_tokens - MAX_NEW_TOKENS["freq_words_extraction"]) // 50)
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."  # the top-ranked word is noise
    template, prefix = TEMPLATES["freq_words_extraction"]
    shuffle_seed = f"fwe/{seed}/order"

    def build(n: int):
        counts = [int(n * k ** -2.0 / ZETA_2) for k in range(1, len(ranked) + 1)]
        words = [w for w, c in zip(ranked, counts) for _ in range(c)]
        random.Random(shuffle_seed).shuffle(words)
        return template.format(context=" ".join(words)), prefix, {}

    fitted = fit("fwe", tokenizer, n_tokens, build, start=10)
    return sample_of("fwe", fitted, ranked[1:4], n_tokens, depth, seed)
