"""InfiniteBench's synthetic retrieval tasks generated locally, sized in tokens of the model's
own tokenizer: ``passkey``, ``number_string`` and ``kv_retrieval``.

The recipes follow InfiniteBench's ``data/construct_synthetic_dataset.py``:

* ``passkey``: noise lines with "The pass key is K. Remember it. K is the pass key." at a
  depth; K has 5 random digits (:mod:`.passkey`).
* ``number_string``: the same noise with "The sequence of digits is K. Remember it. K is the
  sequence of digits."; K is 5 random digits into which 5 of them are inserted again next
  to themselves (10 digits with repeats, as the recipe builds them).
* ``kv_retrieval``: "JSON data:" and a JSON object of random UUID keys and values; the
  instruction and the question name one key (the one at the requested depth among the
  pairs) and the answer is its value (InfLLM's template, which names the key twice).

Every sample is a chat prompt of ``n_tokens`` tokens (±2%, chat template included), the same
for every attention mode; deterministic in ``seed``.

:func:`make_synthetic_sample` also makes RULER's tasks (:mod:`.ruler`): every task it
makes is in :data:`GENERATED_TASKS`.

    sample = make_synthetic_sample("kv_retrieval", tokenizer, n_tokens=8192, depth=0.5, seed=0)
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass

from ..errors import InfLLMLiteError
from ..tokenizer import Tokenizer
from .passkey import (LENGTH_TOLERANCE, PASSKEY, NeedleTask, check_target, make_needle_sample,
                      token_at)
from .ruler import QA_TASKS, RULER_TASKS, make_ruler_sample
from .ruler_prompt import DEPTH_TASKS as RULER_DEPTH_TASKS
from .ruler_qa import make_qa_sample
from .sample import EvalSample
from .tasks import build_prompt, get_task


@dataclass(frozen=True)
class _RepeatedDigitsTask(NeedleTask):
    """A needle task whose key is ``key_digits`` random digits, each of the next
    ``key_digits`` steps inserting a copy of a digit next to itself (number_string)."""

    def make_key(self, seed: int) -> str:
        rng = random.Random(seed)
        digits = [str(rng.randint(0, 9)) for _ in range(self.key_digits)]
        for k in range(self.key_digits):
            at = rng.randint(0, self.key_digits + k - 1)
            digits.insert(at, digits[at])
        return "".join(digits)


NUMBER_STRING = _RepeatedDigitsTask(
    name="number_string",
    instruction="There is an important info hidden inside a lot of irrelevant text. "
                "Find it. I will quiz you about the important information there.",
    needle="The sequence of digits is {key}. Remember it. {key} is the sequence of digits.",
    question="What is the sequence of digits?",
    key_digits=5,
)

KV_QUESTION = '\nKey: "{key}"\nThe value associated with the specified key is: '  # the record's input

INFINITEBENCH_GENERATED = ("passkey", "number_string", "kv_retrieval")

# InfiniteBench's three, the generated tasks ``--official`` reads from files instead (the
# name older code imports; a plain tuple)
SYNTHETIC_TASKS = INFINITEBENCH_GENERATED
GENERATED_TASKS = INFINITEBENCH_GENERATED + RULER_TASKS  # every task generated here
# the generated tasks whose needle (or gold documents) sits at the sample's depth: the ones
# a depth x length heatmap means something for
DEPTH_TASKS = INFINITEBENCH_GENERATED + RULER_DEPTH_TASKS


def generated_here(task: str, official: bool = False) -> bool:
    """Whether ``task``'s samples are generated here: any of :data:`GENERATED_TASKS`, but
    with ``official`` InfiniteBench's three are read from the official files. RULER has no
    official files (its own scripts generate its data), so its tasks are generated either way."""
    return task in GENERATED_TASKS and not (official and task in SYNTHETIC_TASKS)


def make_synthetic_sample(task: str, tokenizer: Tokenizer, n_tokens: int, depth: float,
                          seed: int, data_dir=None) -> EvalSample:
    """A generated sample of ``task`` (one of :data:`GENERATED_TASKS`) of ``n_tokens`` tokens
    after the chat template, its needle at ``depth`` (0 = first, 1 = last).

    ``meta`` holds ``length`` (the target), ``n_tokens`` (the actual prompt length), ``depth``,
    ``seed`` and ``needle_token`` (index of the needle's first token in the prompt ids).
    """
    if task in QA_TASKS:  # RULER's qa_1, qa_2: from the data files in ``data_dir``
        return make_qa_sample(task, tokenizer, n_tokens, depth, seed, data_dir)
    if task in RULER_TASKS:
        return make_ruler_sample(task, tokenizer, n_tokens, depth, seed)
    if task == "kv_retrieval":
        return make_kv_sample(tokenizer, n_tokens, depth, seed)
    needle_tasks = {"passkey": PASSKEY, "number_string": NUMBER_STRING}
    if task not in needle_tasks:
        raise InfLLMLiteError(f"{task!r} is not a generated task; choose among "
                              f"{', '.join(GENERATED_TASKS)}")
    s = make_needle_sample(needle_tasks[task], tokenizer, n_tokens, depth, seed)
    return EvalSample(task=task, id=_sample_id(task, n_tokens, depth, seed),
                      prompt=s.messages[0]["content"], answers=(s.key,),
                      meta=dict(length=n_tokens, n_tokens=s.n_tokens, depth=depth, seed=seed,
                                needle_token=s.needle_token))


def _sample_id(task: str, n_tokens: int, depth: float, seed: int) -> str:
    return f"{task}-{n_tokens}-d{depth:g}-s{seed}"


def kv_pairs(seed: int, n: int) -> list[tuple[str, str]]:
    """The first ``n`` (key, value) UUID pairs of ``seed``'s stream (a longer list extends a
    shorter one, so resizing a prompt keeps its pairs)."""
    rng = random.Random(seed)

    def draw() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    return [(draw(), draw()) for _ in range(n)]


def _kv_content(pairs: list[tuple[str, str]], key: str) -> tuple[str, str]:
    """The user message and its JSON context: an InfiniteBench kv_retrieval record (context
    "JSON data:" and the object, input the question) through the official template."""
    context = "JSON data:\n" + json.dumps(dict(pairs), ensure_ascii=False)
    record = dict(context=context, input=KV_QUESTION.format(key=key))
    return build_prompt(get_task("kv_retrieval"), record), context


def make_kv_sample(tokenizer: Tokenizer, n_tokens: int, depth: float, seed: int) -> EvalSample:
    """A kv_retrieval prompt of ``n_tokens`` tokens (±2%, or ± one pair's tokens, about 70,
    if that is more): as many UUID pairs as fit, the asked key the pair at ``depth`` of the object."""
    check_target(n_tokens, depth)

    def build(n_pairs: int):
        pairs = kv_pairs(seed, n_pairs)
        at = round(depth * (n_pairs - 1))
        content, context = _kv_content(pairs, pairs[at][0])
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        return pairs, at, content, context, text, ids

    one = len(build(1)[5])
    per_pair = (len(build(9)[5]) - one) / 8  # tokens a pair adds (UUIDs vary a little)
    n_pairs = max(1, 1 + round((n_tokens - one) / per_pair))
    best = None
    for _ in range(6):  # a few full tokenizations: each step corrects by the measured rate
        built = build(n_pairs)
        error = len(built[5]) - n_tokens
        if best is None or abs(error) < abs(len(best[5]) - n_tokens):
            best = built
        step = round(error / per_pair)
        if step == 0 or n_pairs - step < 1:
            break
        n_pairs -= step
    pairs, at, content, context, text, ids = best
    # ±2%, or one pair where a pair is more than that (prompts under about 3,500 tokens)
    if abs(len(ids) - n_tokens) > max(LENGTH_TOLERANCE * n_tokens, per_pair):
        raise InfLLMLiteError(f"n_tokens={n_tokens} is too small for a kv_retrieval prompt: one "
                              f"key-value pair and the question take {one} tokens"
                              if len(pairs) == 1 else
                              f"could not size the kv_retrieval prompt to {n_tokens} tokens "
                              f"(got {len(ids)})")
    key, value = pairs[at]
    pair_char = text.index(context) + context.index(json.dumps(key))
    return EvalSample(task="kv_retrieval", id=_sample_id("kv_retrieval", n_tokens, depth, seed),
                      prompt=content, answers=(value,),
                      meta=dict(length=n_tokens, n_tokens=len(ids), depth=depth, seed=seed,
                                needle_token=token_at(tokenizer, ids, pair_char),
                                n_pairs=len(pairs), key=key))
