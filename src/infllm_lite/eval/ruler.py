"""RULER's synthetic tasks (NVIDIA/RULER, Apache-2.0) generated here, sized in tokens of the
model's own tokenizer: ``niah_single_1/2/3``, ``niah_multikey_1/2/3``, ``niah_multivalue``,
``niah_multiquery``, ``vt``, ``cwe``, ``fwe`` (and ``qa_1``/``qa_2`` from data files:
:mod:`.ruler_qa`).

The recipes follow RULER's ``scripts/data/synthetic/`` (niah.py, variable_tracking.py,
common_words_extraction.py, freq_words_extraction.py), the task settings its
``scripts/synthetic.yaml``, the templates and answer prefixes its
``scripts/data/synthetic/constants.py`` (copied verbatim in :data:`TEMPLATES`). As RULER
runs them, the prompt is the template in the model's chat template followed by the answer
prefix (the start of the assistant's turn), so the task is fed as raw text
(``TaskSpec.chat`` false, the chat template applied here). Changes, all for local data:

* essays (RULER: Paul Graham's) are the Python documentation's help topics, and words
  (RULER: ``wonderwords`` lists; niah keys are "adjective-noun") are words of that text
  (:mod:`.ruler_text`); sentences are split on end punctuation (RULER: nltk ``sent_tokenize``);
* a needle's place comes from the runner's ``depth`` where a task has a needle asked for:
  the first asked-for needle sits at ``depth`` of the haystack, the others where the seed
  puts them (RULER draws every depth at random);
* the prompt is sized to ``n_tokens`` (±2%, or ± one haystack unit where a unit is more:
  a noise line, a needle, a document), where RULER fits prompt plus answer under the length.

Every sample is deterministic in ``(task, seed)``; ``meta`` holds ``length``, ``n_tokens``,
``depth``, ``seed`` and, for the niah tasks, ``needle_token``.
"""

from __future__ import annotations

import math
import random
import string
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from ..errors import InfLLMLiteError
from ..tokenizer import Tokenizer
from .passkey import LENGTH_TOLERANCE, check_target, token_at
from .ruler_text import NOISE, essay_words, sentences, word_list
from .sample import EvalSample

# RULER scripts/data/synthetic/constants.py: (template, answer prefix) per task family
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
METRIC = {t: "string_match_part" if f == "qa" else "string_match_all" for t, f in FAMILY.items()}
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."


def make_ruler_sample(task: str, tokenizer: Tokenizer, n_tokens: int, depth: float,
                      seed: int) -> EvalSample:
    """A sample of RULER's ``task`` (not qa: :mod:`.ruler_qa`) of ``n_tokens`` prompt tokens
    (the ids the runner feeds: chat template and answer prefix included), deterministic in
    ``seed``."""
    check_target(n_tokens, depth)
    if task in NIAH:
        return _niah(task, tokenizer, n_tokens, depth, seed)
    makers = {"vt": _vt, "cwe": _cwe, "fwe": _fwe}
    if task in makers:
        return makers[task](tokenizer, n_tokens, depth, seed)
    if task in QA_TASKS:
        raise InfLLMLiteError(f"{task} is built from data files: ruler_qa.make_qa_sample "
                              "(or synthetic.make_synthetic_sample with data_dir)")
    raise InfLLMLiteError(f"{task!r} is not a RULER task; choose among {', '.join(RULER_TASKS)}")


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


# ---------------------------------------------------------------- niah


def _draw(rng: random.Random, kind: str) -> str:
    if kind == "numbers":  # RULER: 7 digits
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        words = word_list()
        return f"{rng.choice(words)}-{rng.choice(words)}"
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _insert(units: list[str], placed: list[tuple[float, str]]) -> list[str]:
    """``units`` with each ``(fraction, text)`` inserted at that fraction of them (the later
    places first, so each lands where its fraction says)."""
    out = list(units)
    for frac, text in sorted(placed, key=lambda p: -p[0]):
        out.insert(min(len(units), int(frac * len(units) + 0.5)), text)
    return out


def _essay(n_words: int) -> list[str]:
    words = essay_words()
    repeats = -(-n_words // len(words)) if n_words else 0
    return sentences(" ".join((words * max(repeats, 1))[:n_words]))


def _niah(task: str, tokenizer: Tokenizer, n_tokens: int, depth: float, seed: int) -> EvalSample:
    cfg = NIAH[task]
    rng = random.Random(f"{task}/{seed}")
    n_keys = max(cfg.k, cfg.q)
    keys, values = [], []
    while len(keys) < n_keys:
        key = _draw(rng, cfg.type_k)
        if key not in keys:
            keys.append(key)
            values.append([_draw(rng, cfg.type_v) for _ in range(cfg.v)])
    asked = rng.sample(range(n_keys), cfg.q)
    type_v = cfg.type_v
    template, prefix = TEMPLATES["niah"]
    if cfg.q * cfg.v == 1:  # RULER's singular wording
        template, prefix = (s.replace("Some", "A").replace("are all", "is").replace("are", "is")
                            .replace("answers", "answer") for s in (template, prefix))
        type_v = type_v[:-1]
    needles = [(NEEDLE.format(type_needle_v=type_v, key=keys[i], value=v), i in asked)
               for i in range(n_keys) for v in values[i]]
    first = next(text for text, is_asked in needles if is_asked)
    placed = [(depth if text == first else rng.random(), text) for text, _ in needles]
    rng.shuffle(placed)
    queries = [keys[i] for i in asked]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    answers = [v for i in asked for v in values[i]]
    hay_seed = f"{task}/{seed}/haystack"

    def build(n: int):
        if cfg.haystack == "essay":
            context = " ".join(_insert(_essay(n), placed))
        else:
            if cfg.haystack == "noise":
                units = [NOISE] * n
            else:  # needles of other keys
                hay = random.Random(hay_seed)
                units = []
                while len(units) < n:
                    key = _draw(hay, cfg.type_k)
                    if key not in keys:
                        units.append(NEEDLE.format(type_needle_v=type_v, key=key,
                                                   value=_draw(hay, cfg.type_v)))
            context = "\n".join(_insert(units, placed))
        fields = dict(type_needle_v=type_v, context=context, query=query)
        return template.format(**fields), prefix.format(**fields), {}

    fitted = fit(task, tokenizer, n_tokens, build, start=1 if cfg.haystack != "essay" else 20)
    needle_token = token_at(tokenizer, fitted.ids, fitted.text.index(first))
    return sample_of(task, fitted, answers, n_tokens, depth, seed, needle_token=needle_token)


# ---------------------------------------------------------------- variable tracking


def _chain(rng: random.Random, num_hops: int = 4) -> tuple[list[str], list[str], str]:
    names: list[str] = []
    while len(names) < num_hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} "
                                             for j in range(num_hops)]
    return names, chain, value


def _vt_text(n_noise: int, chain: list[str], fracs: list[float], value: str) -> tuple[str, str]:
    lines = [NOISE] * n_noise
    for j, (frac, line) in enumerate(zip(fracs, chain)):
        lines.insert(min(n_noise, int(frac * n_noise)) + j, line)
    context = "\n".join(lines).replace(". \n", ".\n")
    template, prefix = TEMPLATES["variable_tracking"]
    fields = dict(context=context, query=value, num_v=len(chain))
    return template.format(**fields), prefix.format(**fields)


def _vt(tokenizer: Tokenizer, n_tokens: int, depth: float, seed: int) -> EvalSample:
    """One chain of 4 hops in noise (RULER's vt), after one worked example (RULER's ICL
    example, about 500 tokens: here 18 noise lines)."""
    rng = random.Random(f"vt/{seed}")
    icl_names, icl_chain, icl_value = _chain(rng)
    icl_user, icl_prefix = _vt_text(18, icl_chain, sorted(rng.random() for _ in icl_chain), icl_value)
    icl = icl_user + icl_prefix + " " + " ".join(icl_names) + "\n"
    names, chain, value = _chain(rng)
    fracs = sorted(rng.random() for _ in chain)

    def build(n: int):
        user, prefix = _vt_text(n, chain, fracs, value)
        return icl + "\n" + user, prefix, {}

    return sample_of("vt", fit("vt", tokenizer, n_tokens, build), names, n_tokens, depth, seed)


# ---------------------------------------------------------------- common and frequent words


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


def _cwe(tokenizer: Tokenizer, n_tokens: int, depth: float, seed: int) -> EvalSample:
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


def _fwe(tokenizer: Tokenizer, n_tokens: int, depth: float, seed: int) -> EvalSample:
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
