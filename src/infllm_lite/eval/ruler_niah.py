"""RULER's haystack tasks (see :mod:`.ruler`): the eight niah tasks (needles in noise, in
essays or among other needles) and vt (a chain of variable assignments in noise)."""

from __future__ import annotations

import random
import string
import uuid

from ..tokenizer import Tokenizer
from .passkey import token_at
from .ruler_prompt import NEEDLE, NIAH, TEMPLATES, fit, sample_of
from .ruler_text import NOISE, essay_words, sentences, word_list
from .sample import EvalSample

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


def make_niah_sample(task: str, tokenizer: Tokenizer, n_tokens: int, depth: float, seed: int) -> EvalSample:
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


def make_vt_sample(tokenizer: Tokenizer, n_tokens: int, depth: float, seed: int) -> EvalSample:
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
