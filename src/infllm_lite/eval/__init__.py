"""Evaluation on InfiniteBench, LongBench and RULER: the official tasks (prompts, answer lengths,
truncation, metrics), InfiniteBench's retrieval tasks and RULER's generated locally, and a resumable
runner that writes predictions, a summary, tables and plots.

    from infllm_lite.eval import EvalPlan, run_eval
    plan = EvalPlan(tasks=["passkey", "kv_retrieval"], modes=["infllm", "full"],
                    lengths=[4096, 16384], samples=10)
    summary = run_eval(model, tokenizer, plan, "eval_out")
"""

from .datasets import load_infinitebench, load_longbench, load_official
from .metrics import METRICS, first_int, first_line, score
from .passkey import (PASSKEY, NeedleSample, NeedleTask, PasskeySample, make_needle_sample,
                      make_passkey_sample, score_passkey)
from .plan import MODES, EvalPlan
from .runner import report_only, run_eval
from .sample import EvalSample, TaskSpec
from .synthetic import GENERATED_TASKS, SYNTHETIC_TASKS, make_synthetic_sample
from .tasks import TASKS, build_prompt, get_task, truncate_ids

__all__ = ["GENERATED_TASKS", "METRICS", "MODES", "PASSKEY", "SYNTHETIC_TASKS", "TASKS",
           "EvalPlan", "EvalSample",
           "NeedleSample", "NeedleTask", "PasskeySample", "TaskSpec", "build_prompt", "first_int",
           "first_line", "get_task", "load_infinitebench", "load_longbench", "load_official",
           "make_needle_sample", "make_passkey_sample", "make_synthetic_sample", "report_only",
           "run_eval", "score", "score_passkey", "truncate_ids"]
