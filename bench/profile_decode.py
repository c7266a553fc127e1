"""Where a decode step's time goes: ``torch.profiler``'s operator table over the decode
steps of one greedy generation (the prefill and the first token not profiled) of the
embedded SmolLM2-135M-Instruct, with the weights and KV cache dtype asked, after an
untimed short warm-up generation (the kernel probe, first-use packing), as
``quantized_decode.py``'s variants (its loading and warm-up).

    python bench/profile_decode.py --quantize gguf --prompt-tokens 2048 --new-tokens 33 [--kv-dtype bfloat16] [--compile]

Each row's share of the profiled time is the result (a busy machine scales the times,
less so the shares); the decode rate of the profiled generation is printed with it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from quantized_decode import VARIANTS, load_variant, prompt_ids, run_once  # noqa: E402
from roofline import machine_info  # noqa: E402

from infllm_lite import MemoryConfig  # noqa: E402
from infllm_lite.generate import generate_ids  # noqa: E402
from infllm_lite.options import KV_DTYPES  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quantize", default="gguf", choices=[v for v in VARIANTS if VARIANTS[v] is not None],
                   help="weights (default gguf: the embedded file's blocks kept packed)")
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=33, help="the first ends the prefill; the rest are profiled")
    p.add_argument("--attention", default="full")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default=None, help="MemoryConfig.kv_dtype (default the model's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--compile", action="store_true", help="generate_ids(compile=True): the compiled decode step's ops")
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (the first token ends the prefill)")

    torch.set_num_threads(args.threads)
    model, tokenizer, *_ = load_variant(args.quantize, 0, args.threads)  # the benchmark's own variants
    ids = prompt_ids(tokenizer, args.prompt_tokens)
    memory = MemoryConfig(kv_dtype=args.kv_dtype) if args.kv_dtype else None

    run_once(model, ids[:64], 4, args.attention, False, memory)  # warm-up: kernel probe, first-use packing
    if args.compile:  # compiled at the profiled length (the static cache's capacity), untimed
        run_once(model, ids, args.new_tokens, args.attention, True, memory)
    prof = profile(activities=[ProfilerActivity.CPU])
    for i, _ in enumerate(generate_ids(model, ids, max_new_tokens=args.new_tokens, attention=args.attention,
                                       memory=memory, stop_token_ids=(), compile=args.compile)):
        if i == 0:  # the prefill and first token are done: profile the rest
            prof.__enter__()
            start = time.perf_counter()
    seconds = time.perf_counter() - start
    prof.__exit__(None, None, None)
    steps = args.new_tokens - 1
    print(f"{args.quantize} weights{' compiled' if args.compile else ''}, kv_dtype {args.kv_dtype or 'float32'}, {args.attention} attention, "
          f"{len(ids)}-token prompt: {steps} decode steps profiled at {steps / seconds:.1f} tok/s "
          f"(profiler on); {machine_info()}")
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    print(f"{'op':<52} {'share':>6} {'ms/step':>8} {'calls/step':>10}")
    for e in events[:args.rows]:
        print(f"{e.key[:52]:<52} {100 * e.self_cpu_time_total / total:5.1f}% "
              f"{e.self_cpu_time_total / 1e3 / steps:8.2f} {e.count / steps:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
