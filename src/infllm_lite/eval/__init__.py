"""Evaluation: locally generated long-context tasks (InfiniteBench's recipes) and their
scoring rules."""

from .passkey import (PASSKEY, NeedleSample, NeedleTask, PasskeySample, first_int,
                      make_needle_sample, make_passkey_sample, score_passkey)

__all__ = ["PASSKEY", "NeedleSample", "NeedleTask", "PasskeySample", "first_int",
           "make_needle_sample", "make_passkey_sample", "score_passkey"]

from .datasets import load_infinitebench, load_longbench, load_official
from .tasks import TASKS, build_prompt, get_task, truncate_ids

__all__ += ["TASKS", "build_prompt", "get_task", "load_infinitebench", "load_longbench",
            "load_official", "truncate_ids"]
