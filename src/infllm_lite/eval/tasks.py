"""The official InfiniteBench and LongBench (English) tasks as the reference, thunlp/InfLLM,
runs them: prompt templates, answer lengths, chat template or raw text, stop strings; the
prompt of an official jsonl record; the reference's "suffix" truncation.

Sources, copied verbatim:

* ``TEMPLATES``: InfLLM ``benchmark/config/dataset2prompt.json``. The LongBench ones equal
  THUDM/LongBench ``config/dataset2prompt.json`` but for narrativeqa, where InfLLM's copy
  reads "asconcisely" (twice) for "as concisely"; kept, since it is what the reference ran.
  The InfiniteBench ones are InfLLM's variants of OpenBMB/InfiniteBench ``src/prompt.py``
  (``gpt4_templates``): kv_retrieval names the key in the instruction, longbook_qa_eng ends
  with "Please answer as short as possible. The answer is:", code_debug closes with its own
  instruction ("Give me your answer ... more information.").
* ``MAX_NEW_TOKENS``: InfLLM ``benchmark/config/dataset2maxlen.json`` (InfiniteBench's own
  ``src/eval_utils.py`` allows fewer, e.g. passkey 6).
* Raw text (no chat template) for trec, triviaqa, samsum, lcc, repobench-p, and a newline
  stop for samsum: InfLLM ``benchmark/pred.py`` (``get_pred``); first line scored for trec,
  triviaqa, samsum: InfLLM ``benchmark/eval.py`` (``scorer``).
* The fields an InfiniteBench record fills in: InfLLM ``benchmark/pred.py``
  (``load_infinite_bench``), as InfiniteBench ``src/eval_utils.py`` (``create_prompt``) does.
  A LongBench record fills the template as it is (``template.format(**record)``).

In the reference the chat-template tasks are tokenized without added special tokens (the
template holds the BOS) and the raw-text tasks with them (a BOS before the text).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from ..errors import InfLLMLiteError
from .ruler_prompt import FAMILY as RULER_FAMILY
from .ruler_prompt import MAX_NEW_TOKENS as RULER_MAX_NEW_TOKENS
from .ruler_prompt import RULER_TASKS
from .sample import TaskSpec

INFINITEBENCH_TASKS = ("passkey", "number_string", "kv_retrieval", "longbook_choice_eng",
                       "longbook_qa_eng", "longbook_sum_eng", "math_find", "code_debug",
                       "longdialogue_qa_eng")
LONGBENCH_TASKS = ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique",
                   "gov_report", "qmsum", "multi_news", "trec", "triviaqa", "samsum",
                   "passage_count", "passage_retrieval_en", "lcc", "repobench-p")

# hotpotqa, 2wikimqa and musique share one template
_MULTI_HOP_QA = (
    "Answer the question based on the given passages. Only give me the answer and do not "
    "output any other words.\n\n"
    "The following are given passages.\n"
    "{context}\n\n"
    "Answer the question based on the given passages. Only give me the answer and do not "
    "output any other words.\n\n"
    "Question: {input}\n"
    "Answer:"
)

# InfLLM benchmark/config/dataset2prompt.json
TEMPLATES: dict[str, str] = {
    "passkey": (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "them. I will quiz you about the important information there.\n\n"
        "{context}\n\n"
        "{input}"
    ),
    "number_string": (
        "There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz "
        "you about the important information there.\n\n"
        "{context}\n\n"
        "{input}"
    ),
    "kv_retrieval": (
        "Extract the value corresponding to the specified key {key} in the JSON object below.\n\n"
        "{context}\n\n"
        "{input}"
    ),
    "longbook_choice_eng": (
        "Read the book and answer the question.\n\n"
        "{context}\n\n"
        "Question: {question}\n\n"
        "Only one of the following options is correct, tell me the answer using one single "
        "letter (A, B, C, or D). Don't say anything else.\n"
        "A. {OPTION_A}\n"
        "B. {OPTION_B}\n"
        "C. {OPTION_C}\n"
        "D. {OPTION_D}"
    ),
    "longbook_qa_eng": (
        "Read the book below and answer a question.\n\n"
        "{context}\n\n"
        "Question: {question}\n\n"
        "Please answer as short as possible. The answer is:"
    ),
    "longbook_sum_eng": "Summarize the following book.\n\n{context}",
    "math_find": "{prefix}\n\n{context}\n\n{input}",
    "code_debug": (
        "There is ONLY ONE function in the large project that is deliberately made to include an "
        "obvious error. Please find the function that contains the most obvious errors. I will "
        "give you four options to narrow your scope. You can inspect the options and think. "
        "Eventually, tell me the answer using one single letter (A, B, C, or D).\n\n"
        "{context}\n\n"
        "Which funtion has deliberate error?\n"
        "A. {OPTION_A}\n"
        "B. {OPTION_B}\n"
        "C. {OPTION_C}\n"
        "D. {OPTION_D}\n\n"
        "Give me your answer for the function that has the deliberate and obvious error in A, B, "
        "C, or D. Your answer MUST be chosen from one of the four options without any "
        "explanation. If you cannot determine answers accurately, you also MUST provide the "
        "answer you think is most likely. Absolutely do not say you do not know or you need more "
        "information."
    ),
    "longdialogue_qa_eng": (
        "Below is a dialogue script where one random occurrence of a character name is replaced "
        "with \"$$MASK$$\", and you should try to guess who that character is.\n\n"
        "The dialogue:\n\n"
        "---\n\n"
        "{context}\n\n"
        "---\n\n"
        "End of dialogue.\n\n"
        "Which character is most likely \"$$MASK$$\"? Just say the name used by the scriptwriter "
        "(before the colon marks) of one single character and nothing else."
    ),
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. "
        "Answer the question asconcisely as you can, using a single phrase if possible. Do not "
        "provide any explanation.\n\n"
        "Story: {context}\n\n"
        "Now, answer the question based on the story asconcisely as you can, using a single "
        "phrase if possible. Do not provide any explanation.\n\n"
        "Question: {input}\n\n"
        "Answer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as "
        "you can, using a single phrase or sentence if possible. If the question cannot be "
        "answered based on the information in the article, write \"unanswerable\". If the "
        "question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not "
        "provide any explanation.\n\n"
        "Article: {context}\n\n"
        " Answer the question based on the above article as concisely as you can, using a single "
        "phrase or sentence if possible. If the question cannot be answered based on the "
        "information in the article, write \"unanswerable\". If the question is a yes/no "
        "question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any "
        "explanation.\n\n"
        "Question: {input}\n\n"
        "Answer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n"
        "{context}\n\n"
        "Now, answer the following question based on the above text, only give me the answer and "
        "do not output any other words.\n\n"
        "Question: {input}\n"
        "Answer:"
    ),
    "hotpotqa": _MULTI_HOP_QA,
    "2wikimqa": _MULTI_HOP_QA,
    "musique": _MULTI_HOP_QA,
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the "
        "report.\n\n"
        "Report:\n"
        "{context}\n\n"
        "Now, write a one-page summary of the report.\n\n"
        "Summary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. "
        "Answer the query in one or more sentences.\n\n"
        "Transcript:\n"
        "{context}\n\n"
        "Now, answer the query based on the above meeting transcript in one or more "
        "sentences.\n\n"
        "Query: {input}\n"
        "Answer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\n"
        "News:\n"
        "{context}\n\n"
        "Now, write a one-page summary of all the news.\n\n"
        "Summary:"
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of "
        "questions.\n\n"
        "{context}\n"
        "{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not "
        "output any other words. The following are some examples.\n\n"
        "{context}\n\n"
        "{input}"
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
        "{context}\n\n"
        "{input}"
    ),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
        "Please carefully read these paragraphs and determine how many unique paragraphs there "
        "are after removing duplicates. In other words, how many non-repeating paragraphs are "
        "there in total?\n\n"
        "{context}\n\n"
        "Please enter the final count of unique paragraphs after removing duplicates. The output "
        "format should only contain the number, such as 1, 2, 3, and so on.\n\n"
        "The final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
        "paragraph the abstract is from.\n\n"
        "{context}\n\n"
        "The following is an abstract.\n\n"
        "{input}\n\n"
        "Please enter the number of the paragraph that the abstract is from. The answer format "
        "must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\n"
        "The answer is: "
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# InfLLM benchmark/config/dataset2maxlen.json
MAX_NEW_TOKENS: dict[str, int] = {
    "passkey": 32, "number_string": 32, "kv_retrieval": 100, "longbook_choice_eng": 32,
    "longbook_qa_eng": 32, "longbook_sum_eng": 1536, "math_find": 32, "code_debug": 32,
    "longdialogue_qa_eng": 32,
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32,
    "musique": 32, "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64,
    "triviaqa": 32, "samsum": 128, "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64,
    "repobench-p": 64,
}

RAW_TEXT = frozenset({"trec", "triviaqa", "samsum", "lcc", "repobench-p"})  # few-shot and code
FIRST_LINE = frozenset({"trec", "triviaqa", "samsum"})
STOP = {"samsum": ("\n",)}

TASKS: dict[str, TaskSpec] = {
    name: TaskSpec(name=name, benchmark=benchmark, template=TEMPLATES[name],
                   max_new_tokens=MAX_NEW_TOKENS[name], metric=name, chat=name not in RAW_TEXT,
                   stop=STOP.get(name, ()), first_line=name in FIRST_LINE)
    for benchmark, names in (("infinitebench", INFINITEBENCH_TASKS), ("longbench", LONGBENCH_TASKS))
    for name in names
}

# RULER's tasks, generated here (eval/ruler.py renders its templates, chat template and answer
# prefix included, so the prompt goes in as raw text)
RULER_SPECS: dict[str, TaskSpec] = {
    name: TaskSpec(name=name, benchmark="ruler", template="{input}",
                   max_new_tokens=RULER_MAX_NEW_TOKENS[RULER_FAMILY[name]], metric=name, chat=False)
    for name in RULER_TASKS
}

TRUNCATION_PREFIX = 128  # ids the reference's "suffix" truncation keeps from the start


def get_task(name: str) -> TaskSpec:
    """The task called ``name`` (an official one of :data:`TASKS` or RULER's); an unknown
    name lists the known ones."""
    spec = TASKS.get(name) or RULER_SPECS.get(name)
    if spec is None:
        raise InfLLMLiteError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}; RULER's "
                              f"(generated): {', '.join(RULER_SPECS)}")
    return spec


def build_prompt(spec: TaskSpec, record: Mapping) -> str:
    """The prompt text of ``record``, one line of the task's official jsonl (the user message,
    or the raw text when the task's ``chat`` is false). Raises ``InfLLMLiteError`` when the
    record lacks what the task needs."""
    if spec.benchmark == "longbench":
        fields = record
    else:
        fields = _infinitebench_fields(spec.name, record)
    try:
        return spec.template.format(**fields)
    except KeyError as e:
        raise InfLLMLiteError(f"{spec.name} record has no field {e.args[0]!r}") from None


def _infinitebench_fields(task: str, record: Mapping) -> dict[str, str]:
    """The template's fields for an InfiniteBench record, as InfLLM's ``load_infinite_bench``
    fills them (``content`` is an older name of ``context``)."""
    context = record["content"] if "content" in record else _field(task, record, "context")
    fields = {"context": context}
    if task in ("passkey", "number_string"):
        fields["input"] = _field(task, record, "input")
    elif task == "kv_retrieval":
        fields["input"] = _field(task, record, "input")
        fields["key"] = kv_retrieval_key(fields["input"])
    elif task == "longbook_qa_eng":
        fields["question"] = _field(task, record, "input")
    elif task == "longbook_choice_eng":
        fields["question"] = _field(task, record, "input")
        fields.update(_options(task, record))
    elif task == "code_debug":
        fields.update(_options(task, record))
    elif task == "math_find":
        fields["input"] = _field(task, record, "input")
        fields["prefix"] = math_find_prefix(fields["input"])
    return fields  # longbook_sum_eng, longdialogue_qa_eng: the context alone


def kv_retrieval_key(question: str) -> str:
    """The key a kv_retrieval question asks for, quotes included: the reference's
    ``input[6:44]``, which it asserts is quoted (``'\\nKey: "<36-character uuid>"\\nThe value
    associated with the specified key is: '``)."""
    if len(question) < 44 or question[6] != '"' or question[43] != '"':
        raise InfLLMLiteError(f"kv_retrieval input has no quoted 36-character key at [6:44]: "
                              f"{question[:60]!r}")
    return question[6:44]


def math_find_prefix(question: str) -> str:
    """The instruction math_find puts before the list: the reference takes the first match of
    ``The .+ of`` in the input ("... The largest number of the list is: "), lower-cases it and
    drops " of": "What is the largest number in the following list?"."""
    match = re.search(r"The .+ of", question)
    if match is None:
        raise InfLLMLiteError(f"math_find input names no target ('The ... of'): {question[:80]!r}")
    return f"What is {match.group(0).lower()[:-3]} in the following list?"


def _options(task: str, record: Mapping) -> dict[str, str]:
    options = _field(task, record, "options")
    if not isinstance(options, list) or len(options) != 4:
        raise InfLLMLiteError(f"{task} record needs 4 options, got {options!r}")
    return {f"OPTION_{letter}": option for letter, option in zip("ABCD", options)}


def _field(task: str, record: Mapping, name: str):
    try:
        return record[name]
    except KeyError:
        raise InfLLMLiteError(f"{task} record has no field {name!r}") from None


def truncate_ids(ids: Sequence[int], max_len: int, max_new: int,
                 keep_prefix: int = TRUNCATION_PREFIX) -> list[int]:
    """The reference's "suffix" truncation: a prompt of more than ``max_len - max_new`` ids
    keeps its first ``keep_prefix`` and its last ``max_len - max_new - keep_prefix``; shorter
    prompts are returned whole.

    InfLLM (``benchmark/pred.py``, ``get_pred``) applies it after the chat template, to the ids
    of the whole prompt (template tokens and BOS included), then decodes the kept ids and
    tokenizes that text again, which can shift the count by a token or two; here the kept ids
    are used as they are. With no truncation set the reference skips the samples over
    ``max_len - max_new`` instead. InfLLM's shipped configs set ``max_len: 2147483647`` and
    ``truncation: suffix``: nothing is cut.
    """
    budget = max_len - max_new
    if budget <= keep_prefix:
        raise InfLLMLiteError(f"max_len - max_new = {max_len} - {max_new} = {budget} leaves no "
                              f"room after the {keep_prefix} kept prefix ids; raise max_len")
    if len(ids) <= budget:
        return list(ids)
    return list(ids[:keep_prefix]) + list(ids[len(ids) - (budget - keep_prefix):])
