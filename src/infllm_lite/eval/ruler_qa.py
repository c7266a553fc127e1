"""RULER's ``qa_1`` (SQuAD) and ``qa_2`` (HotpotQA): a question, its gold documents and as
many distractor documents as fit the length (RULER ``scripts/data/synthetic/qa.py``).

The data is not generated: give RULER's files in ``--data-dir``: ``squad.json`` (SQuAD 2.0
dev, ``dev-v2.0.json``) and ``hotpotqa.json`` (HotpotQA dev distractor,
``hotpot_dev_distractor_v1.json``), as RULER's ``download_qa_dataset.sh`` names them (also
read from ``DIR/ruler/``). The question is the seed's draw among the answerable ones; the
gold documents go at ``depth`` of the document list (RULER shuffles them in).
"""

from __future__ import annotations

import json
import os
import random
from functools import lru_cache
from pathlib import Path

from ..errors import InfLLMLiteError
from ..tokenizer import Tokenizer
from .ruler_prompt import TEMPLATES, fit, sample_of
from .sample import EvalSample

FILES = {"qa_1": "squad.json", "qa_2": "hotpotqa.json"}
DOCUMENT = "Document {i}:\n{document}"


def data_file(task: str, data_dir) -> Path:
    """The task's data file in ``data_dir`` (or its ``ruler/`` folder); a clear error
    otherwise."""
    name = FILES[task]
    if data_dir is not None:
        for path in (Path(data_dir) / name, Path(data_dir) / "ruler" / name):
            if path.is_file():
                return path
    where = (f"in {data_dir}" if data_dir is not None else
             "(no data folder reached the generator: `infllm-lite eval` does not yet pass "
             "--data-dir to generated tasks; call synthetic.make_synthetic_sample(..., data_dir=DIR))")
    raise InfLLMLiteError(
        f"{task} is built from RULER's {name} ({'SQuAD 2.0 dev' if task == 'qa_1' else 'HotpotQA dev distractor'}), "
        f"not found {where}: put it in a folder and pass --data-dir (RULER's "
        "scripts/data/synthetic/json/download_qa_dataset.sh fetches it)")


@lru_cache(maxsize=4)
def read_qa(task: str, path: str) -> tuple[list[dict], list[str]]:
    """(questions, documents) as RULER reads them: each question with its answers, the
    indexes of its gold documents and (SQuAD) of its article's other paragraphs."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if task == "qa_1":
            docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
            index = {c: i for i, c in enumerate(docs)}
            qas = []
            for d in data["data"]:
                article = [index[p["context"]] for p in d["paragraphs"]]
                for p in d["paragraphs"]:
                    for qa in p["qas"]:
                        if not qa.get("is_impossible", False):
                            gold = index[p["context"]]
                            qas.append(dict(query=qa["question"],
                                            outputs=[a["text"] for a in qa["answers"]],
                                            context=[gold],
                                            more=[i for i in article if i != gold]))
            return qas, docs
        docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
        index = {c: i for i, c in enumerate(docs)}
        return [dict(query=d["question"], outputs=[d["answer"]], more=[],
                     context=[index[f"{t}\n{''.join(p)}"] for t, p in d["context"]])
                for d in data], docs
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InfLLMLiteError(f"{path} is not RULER's {FILES[task]} ({type(e).__name__}: {e})") from None


def make_qa_sample(task: str, tokenizer: Tokenizer, n_tokens: int, depth: float, seed: int,
                   data_dir: str | os.PathLike | None) -> EvalSample:
    qas, docs = read_qa(task, str(data_file(task, data_dir)))
    rng = random.Random(f"{task}/{seed}")
    qa = qas[rng.randrange(len(qas))]
    gold, more = qa["context"], qa["more"]
    others = [i for i in range(len(docs)) if i not in set(gold) | set(more)]
    order = more + rng.sample(others, min(len(others), 4096))  # the distractors, in the seed's order
    template, prefix = TEMPLATES["qa"]

    def build(n: int):
        chosen = [docs[i] for i in (order * (n // max(len(order), 1) + 1))[:n]]
        at = min(len(chosen), int(depth * len(chosen) + 0.5))
        listed = chosen[:at] + [docs[i] for i in gold] + chosen[at:]
        context = "\n\n".join(DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(listed))
        return template.format(context=context, query=qa["query"]), prefix, {}

    fitted = fit(task, tokenizer, n_tokens, build, start=0)
    return sample_of(task, fitted, qa["outputs"], n_tokens, depth, seed)
