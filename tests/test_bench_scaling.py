"""bench/scaling.py's pure parts: which cells a resumed run keeps, the time estimate that
skips cells, and the targets table (the benchmark itself runs for hours, not in tests)."""

import argparse
import importlib.util
from pathlib import Path

import pytest

_path = Path(__file__).parents[1] / "bench" / "scaling.py"
_spec = importlib.util.spec_from_file_location("bench_scaling", _path)
scaling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scaling)


def _row(mode, length, threads=2, ttft=1.0, decode=10.0):
    return dict(mode=mode, length=length, target_length=length, threads=threads, ttft_s=ttft,
                prefill_tokens_per_s=length / ttft, decode_tokens_per_s=decode,
                peak_rss_bytes=2**30, kv_bytes=2**20, runs=3,
                roofline=dict(prefill_fraction=0.5, decode_fraction=0.6))


def test_resume_keeps_cells_of_the_same_settings_only(capsys):
    args = argparse.Namespace(runs=3, new_tokens=32, threads=2)
    report = dict(runs=3, new_tokens=32, rows=[_row("infllm", 1024), _row("full", 1024)])
    assert [r["mode"] for r in scaling.reusable_rows(report, args)] == ["infllm", "full"]
    for other in (dict(runs=1), dict(new_tokens=8)):
        assert scaling.reusable_rows({**report, **other}, args) == []
    report["rows"].append(_row("full", 2048, threads=1))
    assert scaling.reusable_rows(report, args) == []
    assert "not resuming" in capsys.readouterr().err


def test_estimate_is_linear_plus_quadratic_in_the_length():
    # t = n/1000 + n²/1e6 at 1K and 2K; decode 32 tokens at 10 tok/s, scaled with the length
    rows = [_row("full", n, ttft=n / 1e3 + n * n / 1e6, decode=10.0) for n in (1000, 2000)]
    assert scaling.estimate_seconds(rows, 4000, 32) == pytest.approx(4 + 16 + 3.2 * 2)
    assert scaling.estimate_seconds([], 4000, 32) is None


def test_targets_compare_cells_of_the_run():
    rows = [_row("full", 2048, ttft=1.0, decode=20.0), _row("transformers", 2048, ttft=1.5, decode=8.0)]
    goals = {g["target"]: g for g in scaling.targets(rows)}
    assert goals["full / transformers prefill at 2K"]["value"] == 1.5
    assert goals["full / transformers decode at 2K"]["met"] is True
    assert goals["infllm prefill 64K / 4K"]["value"] is None
    table = scaling.markdown(rows, [dict(mode="full", length=4096, reason="too slow")],
                             ["full", "transformers"], [2048, 4096], scaling.targets(rows))
    assert "| 4K | full | skipped: too slow |" in table and "not measured" in table


def test_llama_cpp_is_left_out_when_not_installed(monkeypatch, capsys):
    monkeypatch.setattr(scaling, "llama_cpp_installed", lambda: False)
    assert scaling.available_modes(["full", "llama.cpp"]) == ["full"]
    assert "not installed" in capsys.readouterr().err
    monkeypatch.setattr(scaling, "llama_cpp_installed", lambda: True)
    assert scaling.available_modes(["full", "llama.cpp"]) == ["full", "llama.cpp"]


def test_llama_cpp_rows_have_no_float32_roofline():
    row = {**_row("llama.cpp", 2048), "roofline": scaling.roofline_of(_row("llama.cpp", 2048), peaks={})}
    assert row["roofline"] is None
    assert scaling.kv_bytes("llama.cpp", _args(), 2048, None) * 2 == scaling.kv_bytes("full", _args(), 2048, None)
    table = scaling.markdown([_row("full", 2048), row], [], ["full", "llama.cpp"], [2048], [])
    assert "| 2K | llama.cpp | 2048 | – | 1.0 s | 10.0 | – |" in table
    assert "| 2K | full | 2048 | 50% |" in table and "float32 roofline does not apply" in table


def _args():
    return argparse.Namespace(n_layers=2, n_kv_heads=3, head_dim=64)
