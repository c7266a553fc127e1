"""Prefill and decode throughput of our full-attention path against transformers, on the
embedded SmolLM2-135M-Instruct, measured in the same run; and llama.cpp on the same GGUF
file when ``llama-cpp-python`` is installed (``bench/llama_cpp_engine.py``).

    python bench/compare_transformers.py --prompt-len 2048 --new-tokens 32 --runs 3

Prefill: the whole prompt in one call, logits of the last position only (both sides).
Decode: greedy, one token per call, through each side's own KV cache. Medians of ``--runs``.
Compilation (``ours-compiled``) happens in a warm-up run, outside the timed region.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # bench/llama_cpp_engine.py

from infllm_lite import load_model  # noqa: E402
from infllm_lite.attention.full import FullAttentionState  # noqa: E402
from infllm_lite.weights.embedded import embedded_gguf_path  # noqa: E402


def time_ours(model, ids, new_tokens, compiled):
    state = FullAttentionState(model.args, ids.shape[1] + new_tokens)
    step = model.step
    t0 = time.perf_counter()
    logits = model(ids, state, last_only=True)
    t1 = time.perf_counter()
    if compiled:
        state.static = True
        step = compiled
    for _ in range(new_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        logits = step(token, state.positions(1), state)
        state.advance(1)
    t2 = time.perf_counter()
    state.close()
    return t1 - t0, t2 - t1


def time_transformers(ref, ids, new_tokens):
    t0 = time.perf_counter()
    out = ref(ids, use_cache=True, logits_to_keep=1)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        out = ref(token, past_key_values=out.past_key_values, use_cache=True)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--skip-llama-cpp", action="store_true", help="leave llama.cpp out even when installed")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()

    model, _ = load_model(None, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, model.args.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    engines = {"ours-eager": lambda: time_ours(model, ids, args.new_tokens, None)}
    compiled = torch.compile(model.step, dynamic=False, fullgraph=True)
    engines["ours-compiled"] = lambda: time_ours(model, ids, args.new_tokens, compiled)
    if not args.skip_transformers:
        import transformers
        gguf = embedded_gguf_path()
        ref = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                dtype=torch.float32).eval()
        ref.config._attn_implementation = "sdpa"
        engines["transformers-sdpa"] = lambda: time_transformers(ref, ids, args.new_tokens)
    if not args.skip_llama_cpp:
        from llama_cpp_engine import LLAMA_CPP_MISSING, llama_cpp_installed, load_llama_cpp, run_llama_cpp
        if llama_cpp_installed():
            llm = load_llama_cpp(embedded_gguf_path(), args.prompt_len + args.new_tokens + 8,
                                 torch.get_num_threads())
            prompt = ids[0].tolist()
            engines["llama.cpp"] = lambda: run_llama_cpp(llm, prompt, args.new_tokens)
        else:
            print(LLAMA_CPP_MISSING)

    results, timings = {}, {name: [] for name in engines}
    with torch.inference_mode():
        for name, run in engines.items():
            t = time.perf_counter()
            run()  # warm-up (and compilation), outside the timed runs
            results[name] = dict(warmup_s=time.perf_counter() - t)
        for _ in range(args.runs):  # round-robin, so that drift of the machine hits all engines alike
            for name, run in engines.items():
                timings[name].append(run())
    for name, runs in timings.items():
        prefill, decode = zip(*runs)
        results[name].update(prefill_tok_s=args.prompt_len / statistics.median(prefill),
                             decode_tok_s=args.new_tokens / statistics.median(decode),
                             prefill_s_all=list(prefill), decode_s_all=list(decode))
        print(f"{name:18s} prefill {results[name]['prefill_tok_s']:7.1f} tok/s   "
              f"decode {results[name]['decode_tok_s']:6.1f} tok/s   (warm-up {results[name]['warmup_s']:.1f} s)")
    if "transformers-sdpa" in results:
        ref = results["transformers-sdpa"]
        for name in [n for n in results if n != "transformers-sdpa"]:
            print(f"{name}: prefill {results[name]['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x, "
                  f"decode {results[name]['decode_tok_s'] / ref['decode_tok_s']:.2f}x transformers")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(prompt_len=args.prompt_len, new_tokens=args.new_tokens, runs=args.runs,
                    torch=torch.__version__, threads=torch.get_num_threads(),
                    machine=f"{platform.machine()} {platform.processor() or ''}".strip())
        args.out.write_text(json.dumps(dict(meta=meta, results=results), indent=2) + "\n")


if __name__ == "__main__":
    main()
