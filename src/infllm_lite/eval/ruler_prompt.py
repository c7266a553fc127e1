"""RULER's task table and prompt sizing (see :mod:`.ruler`): the templates and answer
prefixes, answer lengths and metrics per task, the raw prompt (chat template, then the
answer prefix) and ``fit``, which sizes a haystack to a token target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import InfLLMLiteError
from ..tokenizer import Tokenizer
from .passkey import LENGTH_TOLERANCE
from .sample import EvalSample

TEMPLATES: dict[str, tuple[str, str]] = {
    "niah": (
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to "
        "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are "
        "all the special magic {type_needle_v} for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are"),
    "variable_tracking": (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        "{context}\nQuestion: Find all variables that are assigned the value {query} in the text "
        "above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
        "variables are assigned the value {query}, they are: "),
    "common_words_extraction": (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most "
        "common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:"),
    "freq_words_extraction": (
        "Read the following coded text and track the frequency of each coded word. Find the "
        "three most frequently appeared coded words. {context}\nQuestion: Do not provide any "
        "explanation. Please ignore the dots '....'. What are the three most frequently appeared "
        "words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words "
        "are:"),
    "qa": (
        "Answer the question based on the given documents. Only give me the answer and do not "
        "output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer "
        "the question based on the given documents. Only give me the answer and do not output "
        "any other words.\n\nQuestion: {query}",
        " Answer:"),
}
MAX_NEW_TOKENS = {"niah": 128, "variable_tracking": 30, "common_words_extraction": 120,
                  "freq_words_extraction": 50, "qa": 32}  # RULER's tokens_to_generate


@dataclass(frozen=True)
class Niah:
    """A niah task of RULER's synthetic.yaml."""

    haystack: str  # "noise", "essay" or "needle"
    type_k: str  # "words", "numbers" or "uuids"
    type_v: str
    k: int = 1  # needles (keys)
    v: int = 1  # values per key
    q: int = 1  # keys asked for


NIAH: dict[str, Niah] = {
    "niah_single_1": Niah("noise", "words", "numbers"),
    "niah_single_2": Niah("essay", "words", "numbers"),
    "niah_single_3": Niah("essay", "words", "uuids"),
    "niah_multikey_1": Niah("essay", "words", "numbers", k=4),
    "niah_multikey_2": Niah("needle", "words", "numbers"),
    "niah_multikey_3": Niah("needle", "uuids", "uuids"),
    "niah_multivalue": Niah("essay", "words", "numbers", v=4),
    "niah_multiquery": Niah("essay", "words", "numbers", q=4),
}
FAMILY = {**{t: "niah" for t in NIAH}, "vt": "variable_tracking", "cwe": "common_words_extraction",
          "fwe": "freq_words_extraction", "qa_1": "qa", "qa_2": "qa"}
RULER_TASKS = tuple(FAMILY)
QA_TASKS = ("qa_1", "qa_2")
# the tasks whose sample puts what the answer needs at the runner's depth (niah: the first
# asked-for needle; qa: the gold documents); vt, cwe and fwe have no such place
DEPTH_TASKS = (*NIAH, *QA_TASKS)
METRIC = {t: "string_match_part" if f == "qa" else "string_match_all" for t, f in FAMILY.items()}
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."


# ---------------------------------------------------------------- prompt and sizing


def render(tokenizer: Tokenizer, user: str, prefix: str) -> str:
    """The raw prompt text: ``user`` in the chat template, then the answer prefix; without
    the tokenizer's leading special text (a BOS) that encoding it adds again."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                         add_generation_prompt=True) + prefix
    with_special = tokenizer.encode("a")
    plain = tokenizer.encode("a", add_special_tokens=False)
    extra = len(with_special) - len(plain)
    if extra > 0 and with_special[extra:] == plain:
        lead = tokenizer.decode(with_special[:extra])
        if lead and text.startswith(lead):
            text = text[len(lead):]
    return text


@dataclass
class Fitted:
    n: int  # haystack units
    text: str
    ids: list
    extra: dict


def fit(task: str, tokenizer: Tokenizer, n_tokens: int,
        build: Callable[[int], tuple[str, str, dict]], start: int = 1) -> Fitted:
    """The haystack size whose prompt is nearest ``n_tokens``: ``build(n)`` gives the user
    message, the answer prefix and what else the sample needs for ``n`` units; secant steps
    on full tokenizations. Raises unless within 2% (or one unit, where that is more)."""
    cache: dict[int, Fitted] = {}

    def measure(n: int) -> Fitted:
        if n not in cache:
            user, prefix, extra = build(n)
            text = render(tokenizer, user, prefix)
            cache[n] = Fitted(n, text, tokenizer.encode(text), extra)
        return cache[n]

    lo, hi = measure(start), measure(start + 64)
    rate = max((len(hi.ids) - len(lo.ids)) / 64, 1e-3)  # tokens a unit adds
    n = max(start, start + round((n_tokens - len(lo.ids)) / rate))
    prev = hi
    for _ in range(12):
        m = measure(n)
        if m.n != prev.n and len(m.ids) != len(prev.ids):  # the secant's slope
            rate = max((len(m.ids) - len(prev.ids)) / (m.n - prev.n), 1e-3)
        prev = m
        error = len(m.ids) - n_tokens
        step = round(error / rate)
        if step == 0:
            step = (error > 0) - (error < 0) if abs(error) > rate / 2 else 0
        nxt = max(start, n - step)
        if step == 0 or nxt in cache:
            break
        n = nxt
    best = min(cache.values(), key=lambda f: abs(len(f.ids) - n_tokens))
    error = abs(len(best.ids) - n_tokens)
    if error > max(LENGTH_TOLERANCE * n_tokens, rate):
        if best.n == start and len(best.ids) > n_tokens:
            raise InfLLMLiteError(f"n_tokens={n_tokens} is too small for a {task} prompt: the "
                                  f"smallest one takes {len(best.ids)} tokens")
        raise InfLLMLiteError(f"could not size the {task} prompt to {n_tokens} tokens "
                              f"(got {len(best.ids)})")
    return best


def sample_id(task: str, n_tokens: int, depth: float, seed: int) -> str:
    return f"{task}-{n_tokens}-d{depth:g}-s{seed}"


def sample_of(task: str, fitted: Fitted, answers, n_tokens: int, depth: float, seed: int,
            **meta) -> EvalSample:
    return EvalSample(task=task, id=sample_id(task, n_tokens, depth, seed), prompt=fitted.text,
                      answers=tuple(answers),
                      meta=dict(length=n_tokens, n_tokens=len(fitted.ids), depth=depth, seed=seed,
                                **meta))
