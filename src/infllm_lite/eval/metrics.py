"""Scoring rules of InfiniteBench, LongBench and RULER, ported from the official code.

    score("qasper", prediction, sample.answers)              # in [0, 1]
    score("trec", first_line(prediction), sample.answers, all_classes=sample.meta["all_classes"])

A sample's score is the max over its references, as both benchmarks do; a task's score is
100 x the mean over its samples (the runner's job, as is scoring only the first line of
trec, triviaqa and samsum: ``first_line``).

Sources (each scorer follows one function of these files):

* LongBench: THUDM/LongBench ``metrics.py`` (``LongBench/metrics.py`` since LongBench v2:
  ``qa_f1_score``, ``rouge_score``, ``classification_score``, ``retrieval_score``,
  ``count_score``, ``code_sim_score``) and ``LongBench/eval.py`` (``dataset2metric``, max over
  ``answers``, first line of trec, triviaqa, samsum). thunlp/InfLLM ``benchmark/eval.py`` is
  a copy of that eval.py.
* InfiniteBench: OpenBMB/InfiniteBench ``src/compute_scores.py`` at 88b3daa
  (``get_score_one_*``) and ``src/eval_utils.py`` (``get_answer``: the label of the choice
  tasks is ``[option_text, letter]``).
* RULER: NVIDIA/RULER ``scripts/eval/synthetic/constants.py`` (``string_match_all``,
  ``string_match_part``, per sample here) and ``scripts/eval/evaluate.py``
  (``postprocess_pred``, applied by ``score`` before them: ``ruler_postprocess``).

Libraries: LongBench's ROUGE-L is the ``rouge`` package's (1.0.1, as the official code);
InfiniteBench's ROUGE-Lsum is ``evaluate.load("rouge")``, which is ``rouge-score``'s
``RougeScorer`` without stemming, called here directly (``evaluate`` fetches the metric
script from the Hub). Both are the ``eval`` extra (``pip install 'infllm-lite[eval]'``),
imported on first use; ``require_scorers`` names a missing one before a run. LongBench's
edit similarity is ``fuzzywuzzy.fuzz.ratio``; the official requirements (LongBench's,
InfLLM's ``fuzzywuzzy==0.18.0``) do not install ``python-Levenshtein``, so fuzzywuzzy falls
back to ``difflib.SequenceMatcher``, which this port uses, with fuzzywuzzy's rounding and its equal/empty-string shortcuts. (With
python-Levenshtein, or rapidfuzz, the ratio is the optimal Indel one and differs: "aba"
vs "bca" is 33 here and 67 there; THUDM/LongBench issue #96.)

``answers`` per task (what the data loaders must produce):

=====================  ======================  ============================================
task                   metric                  answers
=====================  ======================  ============================================
passkey                first_int_match         the key, digits as text: ("71432",)
number_string          first_int_match         the digit string
kv_retrieval           kv_retrieval            the value (a UUID)
math_find              math_find               str() of the JSON number: "42" is compared as
                                               an int, "42.0" (or "2.5") as a float
longbook_choice_eng    longbook_choice         (option_text, letter), get_answer's label
code_debug             code_debug              (option_text, letter); the option is the
                                               function's name
longbook_qa_eng        qa_f1                   the answer list
longdialogue_qa_eng    longdialogue_qa         the answer list; only the first is used
longbook_sum_eng       rouge_lsum              the answer list (one summary)
LongBench tasks        see ``METRICS``         the sample's "answers"; trec also needs
                                               ``all_classes``; passage_retrieval_en's
                                               answers read "Paragraph N"
=====================  ======================  ============================================

Where this differs from the official code:

* math_find scores 0 where the official code crashes: a decimal first number against an
  integer label (``int("2.5")``). A reference the official code cannot read (no "Paragraph N", a
  malformed choice label) raises ``InfLLMLiteError``.
* InfiniteBench's official passkey/number_string/kv_retrieval/math_find read one label; here
  the max over ``answers`` is taken (InfLLM's eval.py does the same; the data has one).
* InfLLM's ``benchmark/infinitebench_eval.py`` is an older copy of compute_scores.py, called
  per reference: its longbook_choice_eng compares ``pred[0] == label`` and, after an "answer
  is" prefix, accepts any character of the option text; its code_debug tries a second prefix
  list ("answer is", "error is") and, when no prefix is found, credits a random letter
  (``random.seed(fn_name)``). Those are not reproduced; expect small differences from
  InfLLM's published code_debug and longbook_choice_eng numbers.
"""

from __future__ import annotations

import difflib
import functools
import re
import string
from collections import Counter
import importlib
import importlib.util
from collections.abc import Callable, Iterable, Sequence

from ..errors import InfLLMLiteError

# ---------------------------------------------------------------- helpers


def first_line(text: str) -> str:
    """The first line after leading newlines: what LongBench scores for trec, triviaqa and
    samsum (``prediction.lstrip('\\n').split('\\n')[0]``)."""
    return text.lstrip("\n").split("\n")[0]


def first_int(prediction: str) -> str:
    """The first run of ASCII digits in ``prediction`` ("" when there is none), InfiniteBench's
    ``first_int_match``."""
    match = re.search(r"[0-9]+", prediction)
    return match.group(0) if match else ""


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, then the words a/an/the, then squeeze whitespace
    (SQuAD's normalisation, shared by LongBench and InfiniteBench)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)
# InfiniteBench blanks these before splitting a prediction into words.
_WORD_SEPARATORS = ("\n", ":", '"', "'", ".", ",", "?", "!", "{", "}")


def _blank(text: str, targets: Sequence[str]) -> str:
    """``text`` with each of ``targets`` (in order) replaced by a space."""
    for target in targets:
        text = text.replace(target, " ")
    return text


def _squeeze_spaces(text: str) -> str:
    """Runs of spaces (only) as one space: InfiniteBench's ``while "  " in pred`` loop."""
    return re.sub(" +", " ", text)


def _share_equal(numbers: list[str], target: str) -> float:
    """The fraction of ``numbers`` equal to ``target`` (0 when there are none)."""
    return sum(number == target for number in numbers) / len(numbers) if numbers else 0.0


def _after_prefix(pred: str, prefixes: Sequence[str], starts: Sequence[str]) -> bool | None:
    """After the first of ``prefixes`` found in ``pred`` (in their order) and one character (a
    space): whether the rest starts with one of ``starts``; None when no prefix is found."""
    for prefix in prefixes:
        at = pred.find(prefix)
        if at == -1:
            continue
        start = at + len(prefix) + 1
        return len(pred) >= start and any(pred[start:].startswith(s) for s in starts)
    return None


def _option_label(answers: Sequence[str]) -> tuple[str, str]:
    """(option_text, letter) of a choice task, checked."""
    if len(answers) != 2 or answers[1] not in ("A", "B", "C", "D"):
        raise InfLLMLiteError(f"a choice task's answers must be (option_text, letter A-D), "
                              f"got {tuple(answers)!r}")
    return answers[0], answers[1]


# ---------------------------------------------------------------- LongBench


def qa_f1(prediction: str, reference: str) -> float:
    """Token F1 of the normalised texts (``qa_f1_score``; InfiniteBench's is the same)."""
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """The ``rouge`` package's ROUGE-L F (``rouge_score``); 0 when it raises, as on an empty
    text or a sentence too long for its recursive LCS."""
    rouge = _rouge()
    try:
        scores = rouge.get_scores([prediction], [reference], avg=True)
    except Exception:  # LongBench: a bare except
        return 0.0
    return scores["rouge-l"]["f"]


def classification(prediction: str, reference: str, all_classes: Sequence[str]) -> float:
    """1/k when the reference is among the k class names found in the prediction, after
    dropping names that are part of the reference (``classification_score``)."""
    found = [name for name in all_classes if name in prediction]
    # LongBench removes from the list it iterates over, which skips the name after each
    # removed one; kept, since it changes scores.
    for name in found:
        if name in reference and name != reference:
            found.remove(name)
    return 1.0 / len(found) if reference in found else 0.0


def retrieval(prediction: str, reference: str) -> float:
    """The share of the prediction's numbers equal to the reference's "Paragraph N"
    (``retrieval_score``)."""
    ids = re.findall(r"Paragraph (\d+)", reference)
    if not ids:
        raise InfLLMLiteError(f"a passage_retrieval_en answer must read 'Paragraph N', "
                              f"got {reference!r}")
    return _share_equal(re.findall(r"\d+", prediction), ids[0])


def count(prediction: str, reference: str) -> float:
    """The share of the prediction's numbers equal to the reference (``count_score``)."""
    return _share_equal(re.findall(r"\d+", prediction), reference)


def code_sim(prediction: str, reference: str) -> float:
    """Edit similarity of the prediction's first line holding no backtick, "#" or "//" (anywhere
    in the line) with the reference line (``code_sim_score``)."""
    lines = prediction.lstrip("\n").split("\n")
    line = next((x for x in lines if "`" not in x and "#" not in x and "//" not in x), "")
    return _fuzz_ratio(line, reference) / 100


def _fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy 0.18.0's ``fuzz.ratio`` without python-Levenshtein."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


# ---------------------------------------------------------------- InfiniteBench


def first_int_match(prediction: str, reference: str) -> bool:
    """The prediction's first integer is the reference (passkey, number_string)."""
    return first_int(prediction) == reference


def kv_retrieval(prediction: str, reference: str) -> bool:
    """The reference is one of the prediction's words once punctuation is blanked."""
    return reference in _blank(prediction, _WORD_SEPARATORS).split()


def math_find(prediction: str, reference: str) -> bool:
    """The prediction's first number (``\\d+\\.\\d+|\\d+``) equals the label, an int or a float
    as ``reference`` reads."""
    label = _json_number(reference)
    match = re.search(r"\d+\.\d+|\d+", prediction)
    if match is None:
        return False
    found = match.group(0)
    if isinstance(label, int):
        return "." not in found and int(found) == label  # official: int("2.5") raises
    return float(found) == label


def _json_number(text: str) -> int | float:
    """``text`` as the JSON number it was written from: "42" an int, "42.0" a float."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise InfLLMLiteError(f"a math_find answer must be a number, got {text!r}")


def longbook_choice(prediction: str, answers: Sequence[str]) -> bool:
    """The first character if it is A-D, else the prediction equal to the option or its letter,
    else what follows an "answer is"-like prefix, else the first A-D word."""
    label = list(_option_label(answers))
    pred = prediction.strip()
    if not pred:
        return False
    if pred[0] in "ABCD":
        return pred[0] in label
    if pred in label:
        return True
    pred = _squeeze_spaces(_blank(pred, ("\n", '"', "'", ".", ",", "?", "!", "{", "}")))
    found = _after_prefix(pred, ("answer is:", "answer:", "answer is", "option is"), label)
    if found is not None:
        return found
    for word in pred.split():
        if word in "ABCD":  # a substring test, as the official code: "AB" passes, then fails
            return word in label
    return False


def code_debug(prediction: str, answers: Sequence[str]) -> bool:
    """The prediction opens with "X." / "X:" for the right letter X, or what follows the
    first answer prefix found starts with the letter or the function's name."""
    fn_name, letter = _option_label(answers)
    pred = prediction.strip()
    if pred[:2] in (f"{letter}.", f"{letter}:"):
        return True
    pred = _squeeze_spaces(_blank(pred, ("\n", "`", "'", '"', "-", "*", "Option", "option")))
    # "correct option is:" never matches ("option" is blanked above); listed as upstream does.
    return bool(_after_prefix(pred, ("answer is:", "is:", "answer:", "correct option is:"),
                              (letter, fn_name)))


def longdialogue_qa(prediction: str, answers: Sequence[str]) -> bool:
    """The first answer (a name, upper-case) is one of the prediction's upper-cased words once
    punctuation is blanked."""
    if not answers:
        raise InfLLMLiteError("longdialogue_qa_eng needs at least one answer")
    return answers[0] in [word.upper() for word in _blank(prediction, _WORD_SEPARATORS).split()]


# C0 control characters, U+0000-U+001F (tab and newline among them; not DEL), as newlines
_CONTROL_TO_NEWLINE = dict.fromkeys(range(0x20), "\n")


def ruler_postprocess(prediction: str) -> str:
    """RULER's ``postprocess_pred`` (``scripts/eval/evaluate.py``), which it applies to every
    prediction before its metrics: strip, make each C0 control character (U+0000-U+001F)
    a newline, strip again. ``strip`` is Python's, so U+001C-U+001F, U+0085 and the Unicode
    spaces go at the ends too."""
    return prediction.strip().translate(_CONTROL_TO_NEWLINE).strip()


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER's ``string_match_all`` for one sample: the share of the references found in the
    prediction, case-insensitive (RULER ``scripts/eval/synthetic/constants.py``)."""
    pred = prediction.lower()
    return sum(r.lower() in pred for r in answers) / len(answers) if answers else 0.0


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """RULER's ``string_match_part`` for one sample: 1 when any reference is in the
    prediction, case-insensitive."""
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in answers))


def rouge_lsum(prediction: str, reference: str) -> float:
    """ROUGE-Lsum F (sentences split at newlines, no stemming), as ``evaluate``'s "rouge"."""
    return _lsum_scorer().score(reference, prediction)["rougeLsum"].fmeasure


@functools.cache
def _rouge():
    return _scorer_module("rouge_l").Rouge()


@functools.cache
def _lsum_scorer():
    # on first use: rouge_score imports nltk (~1 s)
    return _scorer_module("rouge_lsum").RougeScorer(["rougeLsum"], use_stemmer=False)


# the metrics that need a package of the ``eval`` extra: metric -> (module, pip package)
SCORER_PACKAGES: dict[str, tuple[str, str]] = {
    "rouge_l": ("rouge", "rouge"),
    "rouge_lsum": ("rouge_score.rouge_scorer", "rouge-score"),
}
EVAL_EXTRA = "pip install 'infllm-lite[eval]'"


def _missing_message(metric: str, task: str | None = None) -> str:
    package = SCORER_PACKAGES[metric][1]
    what = f"task {task!r} is scored with {metric}, which" if task else f"the {metric} metric"
    return f"{what} needs the package {package} (not installed): {EVAL_EXTRA}"


def _scorer_module(metric: str):
    """The module behind ``metric`` (imported on first use), or a one-line error naming the
    extra to install."""
    try:
        return importlib.import_module(SCORER_PACKAGES[metric][0])
    except ImportError:
        raise InfLLMLiteError(_missing_message(metric)) from None


def require_scorers(tasks: Iterable[str]) -> None:
    """Raise InfLLMLiteError naming the extra to install when a task's metric needs a package
    that is missing (checked without importing it: rouge_score pulls in nltk)."""
    for task in tasks:
        metric = METRICS.get(task)
        if metric in SCORER_PACKAGES and not _importable(SCORER_PACKAGES[metric][0]):
            raise InfLLMLiteError(_missing_message(metric, task))


def _importable(module: str) -> bool:
    """Whether ``module`` can be found (its parent packages imported, itself not)."""
    parent = module.rpartition(".")[0]
    try:
        if parent:
            importlib.import_module(parent)
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------- dispatch

METRICS: dict[str, str] = {
    # InfiniteBench
    "passkey": "first_int_match",
    "number_string": "first_int_match",
    "kv_retrieval": "kv_retrieval",
    "longbook_choice_eng": "longbook_choice",
    "longbook_qa_eng": "qa_f1",
    "longbook_sum_eng": "rouge_lsum",
    "math_find": "math_find",
    "code_debug": "code_debug",
    "longdialogue_qa_eng": "longdialogue_qa",
    # LongBench
    "narrativeqa": "qa_f1",
    "qasper": "qa_f1",
    "multifieldqa_en": "qa_f1",
    "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1",
    "musique": "qa_f1",
    "gov_report": "rouge_l",
    "qmsum": "rouge_l",
    "multi_news": "rouge_l",
    "trec": "classification",
    "triviaqa": "qa_f1",
    "samsum": "rouge_l",
    "passage_count": "count",
    "passage_retrieval_en": "retrieval",
    "lcc": "code_sim",
    "repobench-p": "code_sim",
}
# RULER's tasks (generated here: eval/ruler.py), RULER scripts/eval/synthetic/constants.py
RULER_METRICS: dict[str, str] = {
    t: "string_match_part" if t.startswith("qa_") else "string_match_all"
    for t in ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
              "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery",
              "vt", "cwe", "fwe", "qa_1", "qa_2")}

_RULER_METRICS = frozenset({"string_match_all", "string_match_part"})

# Scorers of one reference (the sample's score is the max over its answers) ...
_PER_REFERENCE: dict[str, Callable[[str, str], float]] = {
    "first_int_match": first_int_match, "kv_retrieval": kv_retrieval, "math_find": math_find,
    "qa_f1": qa_f1, "rouge_lsum": rouge_lsum, "rouge_l": rouge_l, "count": count,
    "retrieval": retrieval, "code_sim": code_sim,
}
# ... and of the whole label list, as InfiniteBench's official code takes it.
_WHOLE_LABEL: dict[str, Callable[[str, Sequence[str]], float]] = {
    "longbook_choice": longbook_choice, "code_debug": code_debug,
    "longdialogue_qa": longdialogue_qa, "string_match_all": string_match_all,
    "string_match_part": string_match_part,
}


def score(task: str, prediction: str, answers: Sequence[str], *,
          all_classes: Sequence[str] | None = None) -> float:
    """``prediction``'s score in [0, 1] on ``task`` against ``answers`` (the max over them;
    the whole list for the choice, dialogue and RULER tasks); trec needs ``all_classes``.
    A RULER task's prediction is cleaned first, as RULER does (:func:`ruler_postprocess`)."""
    if isinstance(answers, str):
        raise InfLLMLiteError(f"answers must be a sequence of references, "
                              f"got the string {answers!r}")
    metric = METRICS.get(task) or RULER_METRICS.get(task)
    if metric is None:
        raise InfLLMLiteError(f"no metric for task {task!r}; known tasks: "
                              f"{', '.join([*METRICS, *RULER_METRICS])}")
    if metric in _RULER_METRICS:  # RULER cleans every prediction before scoring it
        prediction = ruler_postprocess(prediction)
    if metric in _WHOLE_LABEL:
        return float(_WHOLE_LABEL[metric](prediction, answers))
    if metric == "classification":
        if not all_classes:
            raise InfLLMLiteError(f"task {task!r} needs all_classes (the sample's class names)")
        return max((classification(prediction, a, all_classes) for a in answers), default=0.0)
    one = _PER_REFERENCE[metric]
    return max((float(one(prediction, a)) for a in answers), default=0.0)
