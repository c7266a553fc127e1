"""bench/batch_decode.py: its pure parts (the interleaved order, the bandwidth bound, the
medians and table), and one run end to end at tiny sizes (the real run takes minutes on a
quiet machine, not in tests)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
_path = ROOT / "bench" / "batch_decode.py"
_spec = importlib.util.spec_from_file_location("bench_batch_decode", _path)
batch_decode = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(batch_decode)


def test_every_cell_runs_once_per_round_every_other_round_reversed():
    order = batch_decode.plan([1, 2], ["full", "infllm"], runs=3, ttft=False)
    cells = [("engine", "full", 1), ("engine", "infllm", 1), ("engine", "full", 2),
             ("engine", "infllm", 2), ("generate", "full", 1), ("generate", "infllm", 1)]
    assert [o[1:] for o in order] == cells + cells[::-1] + cells
    assert [o[0] for o in order] == [0] * 6 + [1] * 6 + [2] * 6
    with_ttft = [o[1:] for o in batch_decode.plan([1, 2], ["full"], runs=1)]
    assert with_ttft == [("engine", "full", 1), ("ttft", "full", 1), ("engine", "full", 2),
                         ("ttft", "full", 2), ("generate", "full", 1)]


def test_bound_counts_the_weights_once_and_each_sequence_its_keys(smollm):
    model, _ = smollm
    a = model.args
    weights = batch_decode.weight_bytes(model)
    assert weights == 4 * 134515008  # SmolLM2-135M, tied embeddings counted once
    per_key = 2 * a.n_layers * a.n_kv_heads * a.head_dim * 4
    one = batch_decode.bound(a, "full", 1, 2048, 3, weights, 10.0)
    # timed steps see 2048 and 2049 tokens before them, and attend one more key each
    assert one["seq_bytes_per_step"] == pytest.approx(per_key * 2049.5)
    four = batch_decode.bound(a, "full", 4, 2048, 3, weights, 10.0)
    assert four["step_bytes"] == pytest.approx(weights + 4 * per_key * 2049.5)
    assert four["bound_tokens_per_s"] == pytest.approx(4 * 10e9 / four["step_bytes"])
    infllm = batch_decode.bound(a, "infllm", 1, 32768, 2, weights, 10.0)
    from infllm_lite import MemoryConfig
    m = MemoryConfig.for_model(a)
    keys = m.n_init + m.n_local + m.topk * m.block_size
    assert infllm["seq_bytes_per_step"] >= per_key * keys  # plus the representative vectors scored
    assert infllm["seq_bytes_per_step"] < per_key * keys * 1.5


def _row(kind, mode, n, rate, run=0):
    return dict(kind=kind, mode=mode, concurrency=n, run=run, decode_tokens_per_s=rate,
                engine_decode_tokens_per_s=rate, seq_ms_per_step_median=1e3 / rate * n,
                ttft_median_s=0.5 * n, ttft_max_s=1.0 * n)


def test_medians_ratios_and_table():
    rows = [_row("engine", "full", 1, r) for r in (10.0, 11.0, 12.0)] + \
           [_row("engine", "full", 2, r) for r in (18.0, 22.0, 19.0)] + \
           [_row("generate", "full", 1, r) for r in (11.0, 11.0, 12.0)]
    bounds = {("full", 1): dict(bound_tokens_per_s=20.0), ("full", 2): dict(bound_tokens_per_s=40.0)}
    cells = {(c["kind"], c["concurrency"]): c for c in batch_decode.summarize(rows, bounds)}
    assert cells[("engine", 1)]["decode_tokens_per_s"] == 11.0
    assert cells[("engine", 2)]["ratio_to_one"] == pytest.approx(19.0 / 11.0)
    assert cells[("engine", 2)]["bound_fraction"] == pytest.approx(19.0 / 40.0)
    assert cells[("generate", 1)]["ratio_to_one"] == 1.0
    settings = dict(prompt_len=2048, new_tokens=64, threads=2, runs=3, bandwidth_gb_s=10.0, step_tokens=0)
    table = batch_decode.markdown(batch_decode.summarize(rows, bounds), settings)
    assert "| full | 2 | 19.0 | 1.73x | 105.3 | 1.00 s / 2.00 s | 40.0 | 48% |" in table
    assert "| full | 1 (generate_ids) | 11.0 | 1.00x |" in table
    assert "generate_ids decode tok/s: full 1.00x" in table
    ttft = dict(kind="ttft", mode="full", concurrency=2, run=0, decode_tokens_per_s=None,
                ttft_median_s=0.7, ttft_max_s=1.9)
    table = batch_decode.markdown(batch_decode.summarize(rows + [ttft], bounds),
                                  {**settings, "ttft_step_tokens": 512})
    assert "| TTFT, 512-token steps |" in table
    assert "| 1.00 s / 2.00 s | 0.70 s / 1.90 s | 40.0 | 48% |" in table


def test_prompts_are_distinct_windows_of_the_exact_length(tokenizer):
    prompts = batch_decode.make_prompts(tokenizer, 4, 300)
    assert [len(p) for p in prompts] == [300] * 4
    assert len({tuple(p) for p in prompts}) == 4
    assert prompts == batch_decode.make_prompts(tokenizer, 4, 300)  # deterministic


def test_a_tiny_run_writes_json_table_and_plot(tmp_path):
    out = tmp_path / "bd"
    cmd = [sys.executable, str(_path), "--prompt-len", "64", "--new-tokens", "3", "--concurrency", "1,2",
           "--runs", "1", "--threads", "1", "--modes", "full,infllm", "--out", str(out),
           "--roofline-runs", "1", "--roofline-mbytes", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("batch_decode.json", "batch_decode.md", "batch_decode.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    report = json.loads((out / "batch_decode.json").read_text())
    assert len(report["rows"]) == 10 and report["settings"]["prompt_len"] == 64
    for row in report["rows"]:
        if row["kind"] == "ttft":  # the engine's default steps: first tokens only
            assert len(row["ttft_s"]) == row["concurrency"] and row["step_tokens"] == 512
            continue
        assert row["decode_tokens_per_s"] > 0
        if row["kind"] == "engine":  # every timed step decoded all N sequences
            assert row["decode_tokens"] == 2 * row["concurrency"]
            assert row["timed_batch_min"] == row["timed_batch_max"] == row["concurrency"]
    table = (out / "batch_decode.md").read_text()
    for line in ("| full | 1 |", "| full | 2 |", "| infllm | 1 |", "| infllm | 2 |",
                 "| full | 1 (generate_ids) |", "| infllm | 1 (generate_ids) |"):
        assert line in table
    assert table.strip() in proc.stdout
