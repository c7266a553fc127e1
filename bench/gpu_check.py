"""GPU checks, one script to run whenever a CUDA machine is available (it exits with a
message on a machine without one). Run from the repository root:

    python bench/gpu_check.py [--quick]

1. Compiled FlexAttention on CUDA: one InfLLM layer at the embedded model's geometry
   (9 heads, 3 KV heads, head dim 64, its default MemoryConfig), prefill chunks and decode
   steps, compared with the plain kernel on the CPU (outputs, selections, representative
   vectors), then timed (median of CUDA-event timings per 512-query chunk and per decode
   step, compiled flex against the plain kernel on the same GPU).
   The CUDA layer takes the CUDA path: block relevance and representative scores from the
   Triton kernels, selected blocks loaded into the pool's fast tier from pinned host
   memory on a side stream; a second run caps the host tier (blocks on disk) and the fast
   tier (evictions) and must give the same outputs.
2. The embedded model end to end on CUDA: a passkey prompt read with InfLLM (greedy
   answer must equal the CPU's), prefill and decode tokens/s, the pools' counters.
3. The Triton kernels' tests (tests/test_kernels.py) compiled for real (TRITON_INTERPRET=0)
   and the block pool's tests with a CUDA fast tier, then the kernels timed against their
   torch twins (bench/kernels_bench.py).
4. The block pool on CUDA (pinned host tier, asynchronous copies, disk tier) against the
   same operations on the CPU: every read bit-identical, same hits and misses.

Prints one JSON object per check; exit status 1 if any comparison fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict

os.environ["TRITON_INTERPRET"] = "0"  # real kernels here, set before triton is first imported

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def layer_run(kernel: str, device: str, q, k, v, calls, config, args):
    from infllm_lite.attention.base import attend_in_calls
    from infllm_lite.attention.infllm import InfLLMState
    from infllm_lite.rope import RotaryEmbedding

    state = InfLLMState(args, config, kernel=kernel, device=device)
    state.record = True
    with torch.inference_mode():
        out = attend_in_calls(state, q.to(device), k.to(device), v.to(device), calls,
                              RotaryEmbedding(args).to(device))
    return out.cpu(), state.layers[0]


def check_layer(quick: bool) -> dict:
    from infllm_lite.config import ModelArgs
    from infllm_lite.memory_config import MemoryConfig

    args = ModelArgs(model_type="llama", vocab_size=16, dim=576, n_layers=1, n_heads=9, n_kv_heads=3,
                     head_dim=64, intermediate_size=8, rope_theta=100000.0, max_position_embeddings=8192)
    config = MemoryConfig.for_model(args)
    calls = [700, 1, 1100, 617, 1, 1, 1] if quick else [3000, 1, 4100, 617] + [1] * 8
    g = torch.Generator().manual_seed(0)
    L = sum(calls)
    q, k, v = (torch.randn(1, h, L, 64, generator=g) for h in (9, 3, 3))
    ref_out, ref_layer = layer_run("torch", "cpu", q, k, v, calls, config, args)
    out, layer = layer_run("flex", "cuda", q, k, v, calls, config, args)
    same_sel = all(torch.equal(a.cpu(), b) for (_, _, a), (_, _, b) in zip(layer.trace, ref_layer.trace))
    result = {
        "check": "infllm layer, compiled flex on CUDA vs plain on CPU",
        "max_abs_out_diff": (out - ref_out).abs().max().item(),
        "same_selections": same_sel,
        "max_abs_repr_diff": (layer.block_repr.cpu() - ref_layer.block_repr).abs().max().item(),
    }
    result["ok"] = result["max_abs_out_diff"] < 1e-3 and same_sel and result["max_abs_repr_diff"] < 1e-4
    # the same on CUDA with 5 fast-tier slots (evictions) and 3 blocks a layer in host memory
    from dataclasses import replace
    tight = replace(config, max_cached_blocks=max(config.topk + 1, 5), max_host_bytes=3 * 2 * 3 * 128 * 64 * 4)
    out_t, layer_t = layer_run("flex", "cuda", q, k, v, calls, tight, args)
    result["tiers_max_abs_out_diff"] = (out_t - out).abs().max().item()
    result["tiers_pool_stats"] = asdict(layer_t.pool.stats())
    result["ok"] = result["ok"] and result["tiers_max_abs_out_diff"] < 1e-4 and layer_t.pool.stats().blocks_disk > 0

    # timings: one more chunk and decode steps on a warmed-up state, CUDA events
    for kernel in ("flex", "torch"):
        times = {"chunk": [], "decode": []}
        for name, T in (("chunk", config.exc_block_size), ("decode", 1)):
            for _ in range(5 if quick else 20):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                layer_run(kernel, "cuda", q[:, :, :T], k[:, :, :T], v[:, :, :T], [T], config, args)
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end))
        result[f"{kernel}_ms_median"] = {n: statistics.median(t) for n, t in times.items()}
    return result


def check_model(quick: bool) -> dict:
    from infllm_lite import GenerationStats, generate_ids, load_model
    from infllm_lite.eval.passkey import make_passkey_sample, score_passkey
    from infllm_lite.generate import encode_prompt, stop_token_ids

    model, tok = load_model()
    sample = make_passkey_sample(tok, 8192 if quick else 32768, depth=0.5, seed=0)
    ids = encode_prompt(tok, sample.messages)
    stops = stop_token_ids(model, tok)
    answers = {}
    for device in ("cuda", "cpu") if quick else ("cuda",):
        model.to(device)
        start = time.perf_counter()
        new = []
        first = None
        stats = GenerationStats()
        for t in generate_ids(model, ids, max_new_tokens=16, attention="infllm", stop_token_ids=stops,
                              stats=stats):
            first = first or time.perf_counter()
            new.append(t)
        end = time.perf_counter()
        answers[device] = {"answer": tok.decode(new, skip_special_tokens=True),
                           "prefill_tok_s": len(ids) / (first - start),
                           "decode_tok_s": (len(new) - 1) / (end - first) if len(new) > 1 else None,
                           "stats": stats.to_dict()}
    ok = score_passkey(answers["cuda"]["answer"], sample.key)
    if "cpu" in answers:
        ok = ok and answers["cpu"]["answer"] == answers["cuda"]["answer"]
    return {"check": "embedded model, infllm passkey on CUDA", "tokens": len(ids), "key": sample.key,
            **answers, "ok": ok}


def check_kernel_tests(quick: bool) -> dict:
    """The kernel and pool test files on this machine, Triton compiled, then kernel timings."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "tests/test_kernels.py", "tests/test_memory_pool.py"],
                           cwd=ROOT, env=env, capture_output=True, text=True)
    bench = subprocess.run([sys.executable, "bench/kernels_bench.py", *(["--quick"] if quick else [])],
                           cwd=ROOT, env=env, capture_output=True, text=True)
    return {"check": "Triton kernel + pool tests compiled on CUDA, kernel timings",
            "pytest_tail": tests.stdout[-1500:] + tests.stderr[-500:], "bench": bench.stdout[-3000:] + bench.stderr[-500:],
            "ok": tests.returncode == 0 and bench.returncode == 0}


def check_pool(quick: bool) -> dict:
    """A CUDA pool (pinned host tier, side-stream copies, disk tier) against a CPU pool fed
    the same appends and selections: every read bit-identical, same counters."""
    from infllm_lite.memory import BlockPool

    g = torch.Generator().manual_seed(0)
    pools = {dev: BlockPool(1, 3, 128, 64, n_slots=8, dtype=torch.bfloat16, device=dev,
                            max_host_bytes=6 * 2 * 3 * 128 * 64 * 2) for dev in ("cuda", "cpu")}
    same = True
    for step in range(30 if quick else 200):
        k = torch.randn(1, 3, 2, 128, 64, generator=g).to(torch.bfloat16)
        v = torch.randn(1, 3, 2, 128, 64, generator=g).to(torch.bfloat16)
        for dev, pool in pools.items():
            pool.append(k.to(dev), v.to(dev))
        n = pools["cpu"].n_blocks
        ids = torch.randperm(n, generator=g)[:min(n, 6)].tolist()
        for dev, pool in pools.items():
            pool.ensure_resident(ids)
        rk, rv = pools["cuda"].read(ids)
        ck, cv = pools["cpu"].read(ids)
        same &= torch.equal(rk.cpu(), ck) and torch.equal(rv.cpu(), cv)
        slots_c, slots_p = pools["cuda"].slots_of(ids), pools["cpu"].slots_of(ids)
        same &= torch.equal(pools["cuda"].slot_k[:, :, slots_c].cpu(), pools["cpu"].slot_k[:, :, slots_p])
    stats = {dev: asdict(pool.stats()) for dev, pool in pools.items()}
    for pool in pools.values():
        pool.close()
    return {"check": "block pool on CUDA vs CPU", "bit_identical": same, "stats": stats,
            "ok": same and stats["cuda"] == stats["cpu"] and stats["cuda"]["blocks_disk"] > 0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes (a first try)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here")
        return 0
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}))
    ok = True
    for check in (check_kernel_tests, check_pool, check_layer, check_model):
        try:
            result = check(a.quick)
        except Exception as e:  # report and go on with the next check
            result = {"check": check.__name__, "ok": False, "error": f"{type(e).__name__}: {e}"}
        ok &= bool(result.get("ok"))
        print(json.dumps(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
