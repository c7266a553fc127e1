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

The pieces: :mod:`.ruler_prompt` (task table, templates, prompt and sizing),
:mod:`.ruler_niah` (niah, vt), :mod:`.ruler_words` (cwe, fwe), :mod:`.ruler_qa` (qa from data
files), :mod:`.ruler_text` (the local texts); this module is the entry point.
"""

from ..errors import InfLLMLiteError
from ..tokenizer import Tokenizer
from .passkey import check_target
from .ruler_niah import make_niah_sample, make_vt_sample
from .ruler_prompt import (FAMILY, MAX_NEW_TOKENS, METRIC, NIAH, QA_TASKS, RULER_TASKS, TEMPLATES,
                           fit, render)
from .ruler_words import make_cwe_sample, make_fwe_sample
from .sample import EvalSample

__all__ = ["FAMILY", "MAX_NEW_TOKENS", "METRIC", "NIAH", "QA_TASKS", "RULER_TASKS", "TEMPLATES",
           "fit", "make_ruler_sample", "render"]


def make_ruler_sample(task: str, tokenizer: Tokenizer, n_tokens: int, depth: float,
                      seed: int) -> EvalSample:
    """A sample of RULER's ``task`` (not qa: :mod:`.ruler_qa`) of ``n_tokens`` prompt tokens
    (the ids the runner feeds: chat template and answer prefix included), deterministic in
    ``seed``."""
    check_target(n_tokens, depth)
    if task in NIAH:
        return make_niah_sample(task, tokenizer, n_tokens, depth, seed)
    makers = {"vt": make_vt_sample, "cwe": make_cwe_sample, "fwe": make_fwe_sample}
    if task in makers:
        return makers[task](tokenizer, n_tokens, depth, seed)
    if task in QA_TASKS:
        raise InfLLMLiteError(f"{task} is built from data files: ruler_qa.make_qa_sample "
                              "(or synthetic.make_synthetic_sample with data_dir)")
    raise InfLLMLiteError(f"{task!r} is not a RULER task; choose among {', '.join(RULER_TASKS)}")
