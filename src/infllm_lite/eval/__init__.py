"""Evaluation: locally generated long-context tasks (InfiniteBench's recipes) and their
scoring rules."""

from .passkey import (PASSKEY, NeedleSample, NeedleTask, PasskeySample, first_int,
                      make_needle_sample, make_passkey_sample, score_passkey)

__all__ = ["PASSKEY", "NeedleSample", "NeedleTask", "PasskeySample", "first_int",
           "make_needle_sample", "make_passkey_sample", "score_passkey"]
