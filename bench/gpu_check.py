"""GPU checks, one script to run whenever a CUDA machine is available (it exits with a
message on a machine without one). Run from the repository root:

    python bench/gpu_check.py [--quick]

1. Compiled FlexAttention on CUDA: one InfLLM layer at the embedded model's geometry
   (9 heads, 3 KV heads, head dim 64, its default MemoryConfig), prefill chunks and decode
   steps, compared with the plain kernel on the CPU (outputs, selections, representative
   vectors), then timed (median of CUDA-event timings per 512-query chunk and per decode
   step, compiled flex against the plain kernel on the same GPU).
2. The embedded model end to end on CUDA: a passkey prompt read with InfLLM (greedy
   answer must equal the CPU's), prefill and decode tokens/s.

Prints one JSON object per check; exit status 1 if any comparison fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def layer_run(kernel: str, device: str, q, k, v, calls, config, args):
    from infllm_lite.attention.base import attend_in_calls
    from infllm_lite.attention.infllm import InfLLMState
    from infllm_lite.models.rope import RotaryEmbedding

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
    from infllm_lite import generate_ids, load_model
    from infllm_lite.eval.passkey import make_passkey_sample, score_passkey
    from infllm_lite.generate import encode_prompt

    model, tok = load_model()
    sample = make_passkey_sample(tok, 8192 if quick else 32768, depth=0.5, seed=0)
    ids = encode_prompt(tok, sample.messages)
    stops = set(tok.stop_token_ids) | set(model.args.eos_token_ids)
    answers = {}
    for device in ("cuda", "cpu") if quick else ("cuda",):
        model.to(device)
        start = time.perf_counter()
        new = []
        first = None
        for t in generate_ids(model, ids, max_new_tokens=16, attention="infllm", stop_token_ids=stops):
            first = first or time.perf_counter()
            new.append(t)
        end = time.perf_counter()
        answers[device] = {"answer": tok.decode(new, skip_special_tokens=True),
                           "prefill_tok_s": len(ids) / (first - start),
                           "decode_tok_s": (len(new) - 1) / (end - first) if len(new) > 1 else None}
    ok = score_passkey(answers["cuda"]["answer"], sample.key)
    if "cpu" in answers:
        ok = ok and answers["cpu"]["answer"] == answers["cuda"]["answer"]
    return {"check": "embedded model, infllm passkey on CUDA", "tokens": len(ids), "key": sample.key,
            **answers, "ok": ok}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes (a first try)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here")
        return 0
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}))
    ok = True
    for check in (check_layer, check_model):
        try:
            result = check(a.quick)
        except Exception as e:  # report and go on with the next check
            result = {"check": check.__name__, "ok": False, "error": f"{type(e).__name__}: {e}"}
        ok &= bool(result.get("ok"))
        print(json.dumps(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
