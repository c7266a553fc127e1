"""The official InfiniteBench and LongBench files, read into samples: prompt filled in,
references in the form the task's metric takes.

Files are one jsonl per task, ``{task}.jsonl``, looked for in ``data_dir`` and in its
``infinitebench/`` or ``longbench/`` folder (and, for LongBench, ``data/``, as ``data.zip``
unpacks). Without one, the file comes from the Hugging Face hub: InfiniteBench's from the
dataset ``xinrongzhang2022/InfiniteBench`` (one file per task), LongBench's out of the
dataset ``THUDM/LongBench``'s ``data.zip`` (``data/{task}.jsonl``), unpacked once into the
cache folder's ``longbench/`` (``$INFLLM_LITE_CACHE``, or ``~/.cache/infllm_lite``).

References (``EvalSample.answers``), as the reference scores them (InfLLM
``benchmark/pred.py``, ``get_answer``, also in InfiniteBench ``src/eval_utils.py``):
longbook_choice_eng and code_debug give ``(option text, its letter)``; the other InfiniteBench
tasks their ``answer`` list (a lone string or number becomes a list of one), numbers (math_find)
written with ``str``; LongBench its ``answers`` list.

    samples = load_official("qasper", data_dir="~/data")
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from ..errors import InfLLMLiteError
from ..weights.embedded import cache_dir
from .files import read_jsonl
from .sample import EvalSample, TaskSpec
from .tasks import build_prompt, get_task

INFINITEBENCH_REPO = "xinrongzhang2022/InfiniteBench"
LONGBENCH_REPO = "THUDM/LongBench"
LONGBENCH_ZIP = "data.zip"
CHOICE_TASKS = ("longbook_choice_eng", "code_debug")


def load_official(task: str, data_dir: str | os.PathLike | None = None) -> list[EvalSample]:
    """The samples of ``task`` (an InfiniteBench or LongBench task), in file order."""
    benchmark = get_task(task).benchmark
    if benchmark == "ruler":
        raise InfLLMLiteError(f"{task} is a RULER task: RULER has no official files (its scripts "
                              "generate the data), so it is generated here, with or without "
                              "--official")
    if benchmark == "infinitebench":
        return load_infinitebench(task, data_dir)
    return load_longbench(task, data_dir)


def load_infinitebench(task: str, data_dir: str | os.PathLike | None = None) -> list[EvalSample]:
    """The samples of an InfiniteBench task. ``meta``: the official ``id``, ``length`` (the
    context's words, as the reference counts them) and ``all_classes`` (None)."""

    def fields(index: int, record: dict) -> tuple:
        context = record["content"] if "content" in record else record["context"]
        official_id = record.get("id", index)
        return official_id, infinitebench_answers(task, record), {
            "id": official_id, "length": len(context.split()), "all_classes": None}

    return _load(task, "infinitebench", data_dir, fields)


def load_longbench(task: str, data_dir: str | os.PathLike | None = None) -> list[EvalSample]:
    """The samples of a LongBench task. ``meta``: the official ``_id``, ``length`` and
    ``all_classes`` (trec's label set, else None)."""

    def fields(index: int, record: dict) -> tuple:
        answers = record["answers"]
        if not isinstance(answers, list):
            raise InfLLMLiteError(f"'answers' must be a list, got {answers!r}")
        official_id = record.get("_id", index)
        return official_id, tuple(str(a) for a in answers), {
            "_id": official_id, "length": record.get("length"),
            "all_classes": record.get("all_classes")}

    return _load(task, "longbench", data_dir, fields)


def _load(task: str, benchmark: str, data_dir: str | os.PathLike | None,
          fields: Callable[[int, dict], tuple]) -> list[EvalSample]:
    """The samples of ``task``'s file, in file order; ``fields(index, record)`` gives a
    record's official id, references and meta (a bad record names the file and line)."""
    spec = _spec(task, benchmark)
    path = _locate(spec, data_dir)
    samples = []
    for index, record in read_jsonl(path):
        with _record_errors(path, index):
            prompt = build_prompt(spec, record)  # first: a missing field says which
            official_id, answers, meta = fields(index, record)
            samples.append(EvalSample(task=task, id=str(official_id), prompt=prompt,
                                      answers=answers, meta=meta))
    return samples


def infinitebench_answers(task: str, record: Mapping) -> tuple[str, ...]:
    """The references of an InfiniteBench record, as the reference's ``get_answer`` gives
    them: for the choice tasks the answer's option text and its letter; else the answers."""
    answer = record["answer"]
    if task in CHOICE_TASKS:
        if isinstance(answer, list) and len(answer) == 2 and answer[1] in ("A", "B", "C", "D"):
            return (str(answer[0]), answer[1])
        if isinstance(answer, list) and len(answer) == 1:
            answer = answer[0]
        options = record.get("options") or []
        if not isinstance(answer, str) or answer not in options:
            raise InfLLMLiteError(f"{task} answer {answer!r} is not one of the options {options!r}")
        return (answer, "ABCD"[options.index(answer)])
    answers = answer if isinstance(answer, list) else [answer]
    return tuple(str(a) for a in answers)


def _spec(task: str, benchmark: str) -> TaskSpec:
    spec = get_task(task)
    if spec.benchmark != benchmark:
        raise InfLLMLiteError(f"{task!r} is a {spec.benchmark} task, not a {benchmark} one")
    return spec


def _locate(spec: TaskSpec, data_dir: str | os.PathLike | None) -> Path:
    """The task's jsonl in ``data_dir``, else downloaded; else an error saying where to put it."""
    filename = f"{spec.name}.jsonl"
    tried: list[Path] = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        folders = [root, root / spec.benchmark]
        if spec.benchmark == "longbench":
            folders.append(root / "data")  # as data.zip unpacks
        tried = [folder / filename for folder in folders]
        for path in tried:
            if path.is_file():
                return path
    unpacked = cache_dir() / "longbench" / filename
    if spec.benchmark == "longbench" and unpacked.is_file():
        return unpacked
    try:
        from huggingface_hub import hf_hub_download

        if spec.benchmark == "infinitebench":
            return Path(hf_hub_download(INFINITEBENCH_REPO, filename, repo_type="dataset"))
        archive = Path(hf_hub_download(LONGBENCH_REPO, LONGBENCH_ZIP, repo_type="dataset"))
    except Exception as e:  # network, offline, not found: one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InfLLMLiteError(_missing_message(spec, tried, reason)) from e
    return _unpack_longbench(archive, spec.name, unpacked)


def _missing_message(spec: TaskSpec, tried: list[Path], reason: str) -> str:
    """Where the file was looked for, why the download failed, where to put the file."""
    filename = f"{spec.name}.jsonl"
    if spec.benchmark == "infinitebench":
        remote = f"{INFINITEBENCH_REPO}/{filename}"
        source = f"{filename} of https://huggingface.co/datasets/{INFINITEBENCH_REPO}"
    else:
        remote = f"{LONGBENCH_REPO}/{LONGBENCH_ZIP}"
        source = (f"data/{filename} out of {LONGBENCH_ZIP} of "
                  f"https://huggingface.co/datasets/{LONGBENCH_REPO}")
    looked = f"no {', '.join(map(str, tried))}; " if tried else ""
    where = tried[0] if tried else f"DIR/{filename} and pass data_dir=DIR"
    return (f"{spec.benchmark} task {spec.name!r}: {looked}downloading {remote} from the Hugging "
            f"Face hub failed ({reason}); put {source} at {where}")


def _unpack_longbench(archive: Path, task: str, target: Path) -> Path:
    """``data/{task}.jsonl`` out of LongBench's ``data.zip``, written to ``target``."""
    try:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == f"{task}.jsonl"]
            if not names:
                raise InfLLMLiteError(f"{archive} holds no {task}.jsonl")
            member = f"data/{task}.jsonl" if f"data/{task}.jsonl" in names else names[0]
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".part")
            partial.write_bytes(zf.read(member))
            partial.replace(target)
    except zipfile.BadZipFile as e:
        raise InfLLMLiteError(f"{archive} is not a valid zip ({e})") from e
    return target


@contextmanager
def _record_errors(path: Path, index: int) -> Iterator[None]:
    """Turn a record's missing field or bad value into an error naming the file and line."""
    where = f"{path}, line {index + 1}"
    try:
        yield
    except KeyError as e:
        raise InfLLMLiteError(f"{where}: no field {e.args[0]!r}") from None
    except (TypeError, AttributeError) as e:
        raise InfLLMLiteError(f"{where}: malformed record ({e})") from None
    except InfLLMLiteError as e:
        raise InfLLMLiteError(f"{where}: {e}") from None
