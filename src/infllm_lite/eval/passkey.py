"""Needle-in-a-haystack samples built locally with InfiniteBench's recipe, sized in tokens of
the model's own tokenizer, and InfiniteBench's scoring rule.

The recipe (InfiniteBench ``data/construct_synthetic_dataset.py`` and ``src/prompt.py``,
also InfLLM's ``benchmark/config/dataset2prompt.json``): the context is lines of noise,
"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
each ending with a newline, with the needle ("The pass key is K. Remember it. K is the pass
key.") as a line of its own at the chosen depth; the user message is
``"{instruction}\\n\\n{context}\\n\\n{question}"``, rendered with the model's chat template.
The only change: to hit a token target within a few tokens the noise may end with a partial
line (the first sentences of the five).

    sample = make_passkey_sample(tokenizer, n_tokens=32768, depth=0.3, seed=0)
    answer = generate(model, tokenizer, sample.messages, attention="infllm", max_new_tokens=16)
    score_passkey(answer, sample.key)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import InfLLMLiteError
from ..tokenizer import Tokenizer
from .metrics import first_int

NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again.")
LENGTH_TOLERANCE = 0.02  # the prompt is within ±2% of the requested number of tokens


@dataclass(frozen=True)
class NeedleTask:
    """One InfiniteBench-style retrieval task: a needle holding a random key, hidden in noise."""

    name: str
    instruction: str  # before the context
    needle: str  # with ``{key}``
    question: str  # after the context
    key_digits: int

    def make_key(self, seed: int) -> str:
        rng = random.Random(seed)
        return "".join(str(rng.randint(0, 9)) for _ in range(self.key_digits))


PASSKEY = NeedleTask(
    name="passkey",
    # InfiniteBench's and InfLLM's wording, "memorize them" included.
    instruction="There is an important info hidden inside a lot of irrelevant text. "
                "Find it and memorize them. I will quiz you about the important information there.",
    needle="The pass key is {key}. Remember it. {key} is the pass key.",
    question="What is the pass key?",
    key_digits=5,
)


@dataclass(frozen=True)
class NeedleSample:
    """A prompt with a hidden key. ``messages`` is what to send to ``generate``;
    ``prompt_text`` is the chat-templated text and ``n_tokens`` its length in tokens
    (exactly the ids ``generate`` will prefill)."""

    task: str
    messages: list
    prompt_text: str
    key: str
    n_tokens: int
    depth: float  # requested: 0 = the needle opens the context, 1 = it closes it
    seed: int
    context: str  # the haystack alone (noise lines and the needle line)
    needle: str  # the needle line as inserted (without its newline)
    needle_token: int  # index of the needle's first token in the prompt ids


PasskeySample = NeedleSample  # the passkey task's samples (other tasks share the class)


def make_passkey_sample(tokenizer: Tokenizer, n_tokens: int, depth: float, seed: int) -> NeedleSample:
    """A passkey prompt of ``n_tokens`` tokens (±2%, after the chat template) with the key,
    5 digits drawn from ``seed``, at ``depth`` (fraction of the noise before the needle)."""
    return make_needle_sample(PASSKEY, tokenizer, n_tokens, depth, seed)


def make_needle_sample(task: NeedleTask, tokenizer: Tokenizer, n_tokens: int, depth: float,
                       seed: int) -> NeedleSample:
    """A sample of ``task`` sized to ``n_tokens`` tokens of ``tokenizer`` (chat template
    included), the needle at ``depth``; deterministic in ``seed``."""
    check_target(n_tokens, depth)
    key = task.make_key(seed)
    needle = task.needle.format(key=key)
    sizer = _NoiseSizer(tokenizer)

    def build(n_sentences: int) -> tuple[str, list[dict], str, int]:
        context, needle_at = _context(n_sentences, depth, needle)
        messages = [{"role": "user", "content": f"{task.instruction}\n\n{context}\n\n{task.question}"}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return context, messages, text, needle_at

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    # Exact lengths come from tokenizing the whole prompt; in between, the noise's length is
    # predicted from its per-sentence token counts, so a few full tokenizations suffice.
    n_sentences = max(0, round((n_tokens - len(encode(build(0)[2]))) / sizer.tokens_per_sentence))
    best = None
    for _ in range(4):
        built = build(n_sentences)
        ids = encode(built[2])
        actual = len(ids)
        if best is None or abs(actual - n_tokens) < abs(best[1] - n_tokens):
            best = (n_sentences, actual, built, ids)
        if actual == n_tokens:
            break
        offset = actual - sizer.noise_tokens(n_sentences)  # everything but the noise
        guess = sizer.sentences_for(n_tokens - offset)
        if guess == n_sentences:
            break
        n_sentences = guess
    n_sentences, actual, (context, messages, text, needle_at), ids = best
    if abs(actual - n_tokens) > LENGTH_TOLERANCE * n_tokens:
        if n_sentences == 0:
            raise InfLLMLiteError(
                f"n_tokens={n_tokens} is too small for a {task.name} prompt: the instruction, the "
                f"needle and the question alone take {actual} tokens")
        raise InfLLMLiteError(f"could not size the {task.name} prompt to {n_tokens} tokens "
                              f"(got {actual})")
    needle_char = text.index(context) + needle_at
    return NeedleSample(task=task.name, messages=messages, prompt_text=text, key=key,
                        n_tokens=actual, depth=depth, seed=seed, context=context, needle=needle,
                        needle_token=token_at(tokenizer, ids, needle_char))


def check_target(n_tokens: int, depth: float) -> None:
    """Raise InfLLMLiteError unless ``n_tokens`` is a positive int and ``depth`` in [0, 1]."""
    if not isinstance(n_tokens, int) or n_tokens < 1:
        raise InfLLMLiteError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    if not 0.0 <= depth <= 1.0:
        raise InfLLMLiteError(f"depth must be in [0, 1], got {depth}")


def token_at(tokenizer: Tokenizer, ids: list[int], char: int) -> int:
    """Index of the token of ``ids`` that holds character ``char`` of their text (binary
    search on decoded prefixes: tokenizing a prefix alone can split its end differently)."""
    lo, hi = 0, len(ids)  # the last i with len(decode(ids[:i])) <= char
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer.decode(ids[:mid])) <= char:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _context(n_sentences: int, depth: float, needle: str) -> tuple[str, int]:
    """Noise of ``n_sentences`` sentences in lines of five, the needle as a line of its own
    at the line boundary nearest to ``depth``; returns the text and the needle's offset."""
    per_line = len(NOISE_SENTENCES)
    full, rest = divmod(n_sentences, per_line)
    lines = [" ".join(NOISE_SENTENCES) + "\n"] * full
    if rest:
        lines.append(" ".join(NOISE_SENTENCES[:rest]) + "\n")
    at = min(len(lines), round(depth * n_sentences / per_line))
    before = "".join(lines[:at])
    return before + needle + "\n" + "".join(lines[at:]), len(before)


class _NoiseSizer:
    """Token counts of noise, from one tokenization of each prefix of a noise line."""

    def __init__(self, tokenizer: Tokenizer):
        # prefix[r] = tokens of the first r sentences of a line, with its newline (r >= 1)
        self.prefix = [0] + [
            len(tokenizer.encode("x\n" + " ".join(NOISE_SENTENCES[:r]) + "\n", add_special_tokens=False))
            - len(tokenizer.encode("x\n", add_special_tokens=False))
            for r in range(1, len(NOISE_SENTENCES) + 1)]
        self.line = self.prefix[-1]
        self.tokens_per_sentence = self.line / len(NOISE_SENTENCES)

    def noise_tokens(self, n_sentences: int) -> int:
        full, rest = divmod(n_sentences, len(NOISE_SENTENCES))
        return full * self.line + self.prefix[rest]

    def sentences_for(self, target: int) -> int:
        """The number of sentences whose noise length is nearest to ``target`` tokens."""
        if target <= 0:
            return 0
        lo, hi = 0, int(target / self.tokens_per_sentence * 2) + len(NOISE_SENTENCES)
        while lo < hi:  # the first count reaching the target (noise_tokens is nondecreasing)
            mid = (lo + hi) // 2
            if self.noise_tokens(mid) >= target:
                hi = mid
            else:
                lo = mid + 1
        if lo > 0 and target - self.noise_tokens(lo - 1) <= self.noise_tokens(lo) - target:
            return lo - 1
        return lo


def score_passkey(prediction: str, key: str) -> bool:
    """InfiniteBench's passkey rule: the first integer of the prediction equals the key."""
    return first_int(prediction) == str(key)
