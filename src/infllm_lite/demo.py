"""``infllm-lite demo``: a pass key hidden in a long text, read with InfLLM's context memory
and compared with full attention at the same length (or why that is skipped); or, with
``--question``, one short question and its answer streamed. The parser is in ``cli.py``."""

from __future__ import annotations

import time

from .cli_support import load_from_args

DEMO_LENGTH = 32768  # prompt tokens by default
DEMO_LENGTH_NOTE = ("4x the embedded model's native window; InfLLM (default memory, its default "
                    "kernel: compiled window attention on the CPU) read 32K tokens at 392 tokens/s "
                    "(84 s) in the scaling benchmark on our 2-core CPU machines, after compiling "
                    "its attention once (cached on disk).")
QUESTION_NEW_TOKENS = 128  # the short demo's answer length, at most
FULL_BUDGET_S = 300  # full attention is skipped when estimated to take longer
FULL_PROBE = 2048  # tokens of the full-attention prefill timed for that estimate
FULL_CHUNK = 2048  # full attention's prefill call size (bounds its attention-mask memory)
# A flop of attention costs about twice a flop of the matmuls: fitted on the CPU (1 thread),
# embedded model, from 2048- and 16384-token full prefills; the estimate is then within ~10%.
FULL_ATTENTION_COST = 2.0


def run_demo(args) -> None:
    """The demo the parsed command line asks for (options already checked)."""
    if args.question is not None:
        return demo_question(args)
    from .eval.passkey import make_passkey_sample, score_passkey
    from .generate import encode_prompt
    from .memory_config import MemoryConfig

    model, tokenizer = load_from_args(args)
    native = model.args.max_position_embeddings
    sample = make_passkey_sample(tokenizer, args.length, args.depth, args.seed)
    prompt_ids = encode_prompt(tokenizer, sample.messages)
    name = args.model or "the embedded SmolLM2-135M-Instruct"
    print(f"model: {name}, native window {native} tokens")
    print(f"haystack: {sample.n_tokens} tokens ({sample.n_tokens / native:.1f}x the native window), "
          f"a 5-digit pass key at depth {sample.depth:g} (token {sample.needle_token}, "
          f"{sample.n_tokens - sample.needle_token} tokens back from the end of the prompt)")
    if args.attention != "full":
        m = MemoryConfig.for_model(model.args)
        if args.attention == "infllm":
            reach = m.n_init + m.n_local + (m.topk + 1) * m.block_size
            print(f"infllm memory: {m.n_init} initial + {m.n_local} local tokens + the {m.topk} most "
                  f"relevant blocks of {m.block_size} (at most {reach} keys per query), "
                  f"{m.exc_block_size} queries per retrieval, {m.chunk_size} tokens per model call")
        else:
            print(f"streaming memory: {m.n_init} initial + {m.n_local} local tokens; the rest is dropped")

    if args.attention == "infllm":
        _warm_up_infllm(model, prompt_ids)
    print(f"\n[{args.attention}] reading {sample.n_tokens} tokens ...", flush=True)
    answer, seconds, prefill_tps = _run(model, tokenizer, prompt_ids, args.attention, None)
    _report(answer, sample.key, seconds, prefill_tps, score_passkey)

    if args.no_full or args.attention == "full":
        return
    reason = full_attention_skip_reason(model, prompt_ids, native)
    if reason:
        print(f"\n[full attention] skipped: {reason}")
        return
    print(f"\n[full attention] reading the same {sample.n_tokens} tokens ...", flush=True)
    answer, seconds, prefill_tps = _run(model, tokenizer, prompt_ids, "full", FULL_CHUNK)
    _report(answer, sample.key, seconds, prefill_tps, score_passkey)


def demo_question(args) -> None:
    """The short demo: one question, the answer streamed (full attention: it is short)."""
    from .generate import generate
    model, tokenizer = load_from_args(args)
    messages = [{"role": "user", "content": args.question}]
    print(f"question: {args.question}\nanswer: ", end="", flush=True)
    start = time.perf_counter()
    pieces, stats = generate(model, tokenizer, messages, max_new_tokens=QUESTION_NEW_TOKENS,
                             stream=True, return_stats=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    seconds = time.perf_counter() - start
    print(f"[{stats.prompt_tokens} prompt tokens, {stats.new_tokens} new tokens in {seconds:.1f} s]")


def _warm_up_infllm(model, prompt_ids) -> None:
    """Compile InfLLM's attention (a chunk and a decode step) outside the timed reading."""
    from .generate import generate_ids
    from .memory_config import MemoryConfig
    exc = MemoryConfig.for_model(model.args).exc_block_size
    print("\n[infllm] compiling the attention (first use; cached on disk for later runs) ...",
          end="", flush=True)
    start = time.perf_counter()
    for _ in generate_ids(model, prompt_ids[:2 * exc + 7], max_new_tokens=2, attention="infllm"):
        pass
    print(f" {time.perf_counter() - start:.0f} s")


def _run(model, tokenizer, prompt_ids, attention, chunk_size):
    """Greedy answer (16 tokens at most) with a prefill progress bar; returns the answer,
    the total seconds and the prefill speed (prompt tokens / time to the first new token)."""
    from .generate import generate
    start = time.perf_counter()
    answer, stats = generate(model, tokenizer, prompt_ids, max_new_tokens=16, attention=attention,
                             chunk_size=chunk_size, progress=True, return_stats=True)
    return answer.strip(), time.perf_counter() - start, stats.prefill_tokens_per_second


def _report(answer, key, seconds, prefill_tps, score) -> None:
    print(f"answer:   {answer}")
    print(f"true key: {key}  ->  {'RIGHT' if score(answer, key) else 'WRONG'}")
    print(f"time:     {seconds:.1f} s (prefill {prefill_tps:.0f} tokens/s)", flush=True)


def full_attention_skip_reason(model, prompt_ids, native) -> str | None:
    """Why full attention is not run at this length (None: run it): more than 4x the native
    window, or an estimated time above FULL_BUDGET_S."""
    n = len(prompt_ids)
    if n <= FULL_PROBE:
        return None
    too_long = n > 4 * native
    seconds, basis = full_attention_estimate(model, prompt_ids)
    estimate = f"about {_minutes(seconds)} here ({basis})"
    if too_long:
        return (f"{n} tokens is more than 4x the model's native window of {native}: full attention "
                f"would read positions it never saw in training, and it would take {estimate}")
    if seconds > FULL_BUDGET_S:
        return (f"it would take {estimate}, more than this demo's "
                f"{FULL_BUDGET_S // 60}-minute limit")
    return None


def full_attention_estimate(model, prompt_ids) -> tuple[float, str]:
    """Seconds full attention needs to prefill ``prompt_ids``: a measured prefill of the
    first FULL_PROBE tokens, scaled by the floating-point work (matmuls grow linearly with
    the length, causal attention quadratically, at half the speed: FULL_ATTENTION_COST)."""
    from .generate import generate_ids
    n = len(prompt_ids)
    probe = min(n, FULL_PROBE)
    start = time.perf_counter()
    for _ in generate_ids(model, prompt_ids[:probe], max_new_tokens=1, attention="full",
                          chunk_size=FULL_CHUNK):
        pass
    measured = time.perf_counter() - start
    a = model.args
    linear = 2 * sum(p.numel() for name, p in model.named_parameters() if name.startswith("layers."))
    # causal: L²/2 pairs, QK and PV, 2 flops each; weighted by FULL_ATTENTION_COST
    quadratic = FULL_ATTENTION_COST * 2 * a.n_layers * a.n_heads * a.head_dim

    def flops(length: int) -> float:
        return linear * length + quadratic * length * length

    return measured * flops(n) / flops(probe), f"estimated from a {probe}-token prefill in {measured:.1f} s"


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
