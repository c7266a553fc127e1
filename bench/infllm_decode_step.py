"""One decode step of the embedded model (SmolLM2-135M, 30 layers) in InfLLM mode after a
``--length``-token prompt (default 2048, its default ``MemoryConfig.for_model``): median
ms per step (batch 1, ``model.step`` uncompiled, greedy) and median ms of attention per
layer (each layer's ``attend`` timed), each run in a fresh process. Variants, alternated
run by run so that all see the same machine: ``one-query`` (this tree, the decode
step's own path), ``chunk`` (this tree with ``state.one_query = False``: the kernel's
chunk path, as before the one-query path existed), ``other`` (the library under
``--compare-src``, e.g. a worktree of an older commit), ``full`` (full attention, the
baseline). Ratios to the first variant are printed per run.

    python bench/infllm_decode_step.py --runs 3 --variants one-query,chunk,full
    git worktree add /tmp/before HEAD~3 && python bench/infllm_decode_step.py --compare-src /tmp/before/src
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def one(length: int, steps: int, mode: str, kernel: str, threads: int, one_query: bool) -> dict:
    import infllm_lite
    from infllm_lite import load_model
    from infllm_lite.attention import make_attention_state
    from infllm_lite.generate import prefill

    torch.set_num_threads(threads)
    model, _ = load_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.args.vocab_size, (1, length), generator=g)
    state = make_attention_state(mode, model.args, capacity=length + steps + 1, kernel=kernel)
    if not one_query:
        state.one_query = False
    per_layer: list[float] = []  # seconds of each layer's attend, this step

    def timed(attend):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            y = attend(*a, **kw)
            per_layer.append(time.perf_counter() - t0)
            return y
        return wrapper

    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = prefill(model, state, ids, chunk_size=8192)
        prefill_s = time.perf_counter() - t0
        for layer in state.layers:
            layer.attend = timed(layer.attend)
        step_ms, attn_ms, tokens = [], [], []
        for _ in range(steps):
            token = logits[:, -1].argmax(dim=-1)  # (1,)
            tokens.append(int(token))
            per_layer.clear()
            t0 = time.perf_counter()
            logits = model.step(token[:, None], state.positions(1), state)
            state.advance(1)
            step_ms.append(1e3 * (time.perf_counter() - t0))
            attn_ms.append(1e3 * sum(per_layer) / len(per_layer))
    state.close()
    warm = max(1, steps // 10)  # the first steps compile or warm caches
    return {"src": os.path.dirname(os.path.dirname(infllm_lite.__file__)), "prefill_s": prefill_s,
            "step_ms": statistics.median(step_ms[warm:]), "attn_ms_per_layer": statistics.median(attn_ms[warm:]),
            "tokens": tokens}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kernel", default="auto")
    p.add_argument("--variants", default=None,
                   help="comma-separated: one-query, chunk, other, full (default: one-query,chunk, "
                        "and other with --compare-src)")
    p.add_argument("--compare-src", default=None, help="src folder of the library to compare with")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a variant, in this process
    args = p.parse_args(argv)
    if args.one:
        mode = "full" if args.one == "full" else "infllm"
        print(json.dumps(one(args.length, args.steps, mode, args.kernel, args.threads, args.one != "chunk")))
        return 0
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    variants = (args.variants.split(",") if args.variants
                else ["one-query", "chunk"] + (["other"] if args.compare_src else []))
    if "other" in variants and not args.compare_src:
        p.error("the variant other needs --compare-src")
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.runs):
        for name in variants:  # alternate, so all see the same conditions
            src = args.compare_src if name == "other" else here
            one_arg = "one-query" if name == "other" else name  # an older tree has no switch
            env = dict(os.environ, PYTHONPATH=src)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", one_arg, "--length",
                                  str(args.length), "--steps", str(args.steps), "--kernel", args.kernel,
                                  "--threads", str(args.threads)],
                                 env=env, check=True, capture_output=True, text=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    print(f"{args.length}-token prompt, {args.steps} steps, {args.threads} threads, kernel {args.kernel}")
    for name, rows in results.items():
        ms = [r["step_ms"] for r in rows]
        attn = [r["attn_ms_per_layer"] for r in rows]
        print(f"{name:>9} ({rows[0]['src']}): {statistics.median(ms):.2f} ms/step "
              f"(runs {', '.join(f'{m:.2f}' for m in ms)}), attention {statistics.median(attn):.3f} ms/layer "
              f"(runs {', '.join(f'{a:.3f}' for a in attn)}), prefill {statistics.median(r['prefill_s'] for r in rows):.1f} s")
    first = variants[0]
    for name in variants[1:]:
        a, b = results[first], results[name]
        steps = ", ".join(f"{x['step_ms'] / y['step_ms']:.2f}" for x, y in zip(a, b))
        attn = ", ".join(f"{x['attn_ms_per_layer'] / y['attn_ms_per_layer']:.2f}" for x, y in zip(a, b))
        same = "" if name == "full" else f"; same greedy tokens: {all(x['tokens'] == y['tokens'] for x, y in zip(a, b))}"
        print(f"{first} / {name}: step time per run {steps}; attention per layer per run {attn}{same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
