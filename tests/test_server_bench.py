"""bench/serve_load.py: its pure parts, and one tiny run end to end (its own server on a
free localhost port, 1 and 2 clients, full attention, a few tokens)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

_path = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"
_spec = importlib.util.spec_from_file_location("bench_serve_load", _path)
serve_load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_load)


def test_percentile_and_summary():
    assert serve_load.percentile([], 0.5) is None
    assert serve_load.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert serve_load.percentile([0.0, 10.0], 0.95) == pytest.approx(9.5)
    rows = [{"tokens": 4, "error": None, "ttft_s": 0.5, "tpot_s": 0.1},
            {"tokens": 0, "error": "HTTP 429: full", "ttft_s": None, "tpot_s": None}]
    cell = serve_load.summarize("full", 2, rows, wall=2.0)
    assert cell["errors"] == 1 and cell["output_tok_per_s"] == 2.0 and cell["requests_per_s"] == 0.5
    assert cell["first_error"] == "HTTP 429: full" and cell["tpot_p50_ms"] == pytest.approx(100.0)
    one = serve_load.summarize("full", 1, rows[:1], wall=4.0)
    table = serve_load.markdown([one, cell], {"prompt_tokens": 8, "max_tokens": 4, "requests": 1})
    assert "| full | 2 | 0.50 | 2.0 | 2.00x (goal ≥ 3x: missed) |" in table


def test_a_tiny_load_test_runs_end_to_end(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(_path), "--clients", "1,2", "--modes", "full", "--requests", "1",
                           "--prompt-tokens", "32", "--max-tokens", "3", "--out", str(out),
                           "--server-args", "--attention-kernel window-eager"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "serve_load.json").read_text())
    assert [(c["mode"], c["clients"], c["requests"], c["errors"]) for c in report["cells"]] == [
        ("full", 1, 1, 0), ("full", 2, 2, 0)]
    assert all(0 < c["output_tokens"] <= 3 * c["requests"] for c in report["cells"])
    assert "| full | 2 |" in (out / "serve_load.md").read_text()
    assert (out / "serve_load.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        serve_load.main(["--url", "http://example.com:8000", "--out", str(tmp_path / "x")])
