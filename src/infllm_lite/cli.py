"""The ``infllm-lite`` command line: generate, convert, demo."""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

from .cli_support import load_from_args, memory_config_from_args, parse_max_len  # noqa: F401 (re-exported for tests)
from .errors import InfLLMLiteError
from .options import parse_lengths  # noqa: F401

DTYPES = ("float32", "bfloat16", "float16")

# The long-context demo (``infllm-lite demo``).
DEMO_LENGTH = 32768  # prompt tokens by default
DEMO_LENGTH_NOTE = ("4x the embedded model's native window; InfLLM (compiled FlexAttention, "
                    "default memory) read it at 168-224 tokens/s in two runs, 2.5-3.5 min, on our "
                    "2-core CPU machines, after compiling its attention once (cached on disk).")
FULL_BUDGET_S = 300  # full attention is skipped when estimated to take longer
FULL_PROBE = 2048  # tokens of the full-attention prefill timed for that estimate
FULL_CHUNK = 2048  # full attention's prefill call size (bounds its attention-mask memory)
# A flop of attention costs about twice a flop of the matmuls: fitted on the CPU (1 thread),
# embedded model, from 2048- and 16384-token full prefills; the estimate is then within ~10%.
FULL_ATTENTION_COST = 2.0


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="SRC", default=None,
                   help="a Hugging Face model folder, a hub id (owner/name[@rev]) or a .gguf file; "
                        "default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype (default: float32 on the CPU, bfloat16 on GPUs)")


def _add_sampling_options(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                   help=f"stop after N new tokens (default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k best tokens (default 0: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    _add_sampling_options(p, 256)
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop before this string (repeatable)")
    p.add_argument("--attention", default="full", metavar="MODE",
                   help="full (default), streaming or infllm; infllm reads inputs far beyond the model's window")
    p.add_argument("--chunk-size", type=int, default=None, help="prefill tokens per model call (default 8192)")
    _add_memory_options(p)
    p.add_argument("--compile", action="store_true",
                   help="compile the whole decode step with torch.compile (full attention only)")
    p.add_argument("--stats", action="store_true",
                   help="print speed and memory-tier counters to stderr when done")


# infllm_lite.attention.infllm.KERNELS, spelled out here so that --help needs no torch import
ATTENTION_KERNELS = ("auto", "flex", "flex-eager", "window", "window-eager", "torch")


def _add_memory_options(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("memory (streaming and infllm; default: suited to the model's native window)")
    for name, meaning in (("n-init", "initial (sink) tokens"), ("n-local", "local window in tokens"),
                          ("block-size", "tokens per memory block"), ("topk", "blocks retrieved per chunk"),
                          ("max-cached-blocks", "fast-tier block slots per layer")):
        m.add_argument(f"--{name}", type=int, default=None, help=meaning)
    m.add_argument("--cache-policy", choices=("lru", "lru-s"), default=None,
                   help="which cached block the fast tier evicts (default lru)")
    m.add_argument("--max-host-bytes", type=parse_bytes, default=None, metavar="SIZE",
                   help="host memory for memory blocks, all layers (e.g. 8GiB); older blocks go to "
                        "a file on disk (default: unlimited)")
    m.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="directory of the offload file (default: a temporary directory, removed after)")
    m.add_argument("--attention-kernel", default="auto", choices=ATTENTION_KERNELS,
                   help="how infllm computes attention: auto (default: window on the CPU, flex on "
                        "a GPU), window (compiled dense attention over each query tile's key "
                        "window), flex (compiled FlexAttention), window-eager, flex-eager, or torch "
                        "(plain, every logit materialised: for debugging)")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'8GiB', '500MB', '1.5gib', '123456' -> bytes."""
    import re
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes (e.g. 8GiB, 500MB, 1000000)")
    return int(float(match.group(1)) * _UNITS[unit])


HELP_LINE = "Inside: /reset, /save FILE, /load FILE, /stats, /help, /exit; Ctrl-C stops an answer."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infllm-lite",
        description="Long-context inference with InfLLM context memory, in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    g = sub.add_parser("generate", help="continue a prompt (or answer it with --chat)",
                       description="Generate text from a prompt and stream it to stdout.")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="the prompt text")
    src.add_argument("--prompt-file", metavar="FILE", type=Path, help="read the prompt from a UTF-8 file")
    g.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the model's chat template")
    g.add_argument("--system", metavar="TEXT", default=None, help="system message (with --chat)")
    _add_model_options(g)
    _add_generation_options(g)

    c = sub.add_parser("convert", help="convert a GGUF file into a Hugging Face model folder",
                       description="Dequantize a GGUF checkpoint into config.json, model.safetensors "
                                   "(float32), tokenizer.json and tokenizer_config.json.")
    c.add_argument("gguf", type=Path, metavar="FILE.gguf")
    c.add_argument("out_dir", type=Path, metavar="OUT_DIR")

    d = sub.add_parser(
        "demo", help="long-context demo: find a pass key hidden in a long text",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="\n\n".join(textwrap.fill(paragraph, 88) for paragraph in (
            "Hide a 5-digit pass key in a long text (InfiniteBench's passkey task), ask the model "
            "for it with InfLLM's context memory, then show what full attention answers at the "
            "same length, or why that is skipped (more than 4x the model's native window, or "
            f"more than {FULL_BUDGET_S // 60} minutes estimated).",
            f"The default length, {DEMO_LENGTH} tokens, is {DEMO_LENGTH_NOTE}",
            "--question TEXT gives the short demo instead: one question, the answer streamed.")))
    d.add_argument("--length", type=int, default=DEMO_LENGTH, metavar="N",
                   help=f"prompt length in tokens (default {DEMO_LENGTH})")
    d.add_argument("--depth", type=float, default=0.5, metavar="F",
                   help="where the key sits in the text: 0 = start, 1 = end (default 0.5)")
    d.add_argument("--seed", type=int, default=0, metavar="S", help="picks the key (default 0)")
    d.add_argument("--attention", default="infllm", choices=("infllm", "streaming", "full"),
                   help="attention mode that reads the haystack (default: infllm)")
    d.add_argument("--no-full", action="store_true",
                   help="do not compare with full attention")
    d.add_argument("--question", metavar="TEXT", default=None,
                   help="instead of the haystack, ask a short question and stream the answer")
    _add_model_options(d)

    ch = sub.add_parser(
        "chat", help="chat in the terminal; the whole conversation stays in the attention memory",
        description="A terminal chat: answers stream token by token, each turn reads only its new "
                    "tokens, /save and /load keep the memory across sessions. " + HELP_LINE)
    ch.add_argument("--attention", default="infllm", choices=("infllm", "streaming", "full"),
                    help="attention mode (default infllm: unbounded conversations)")
    ch.add_argument("--system", metavar="TEXT", default=None, help="system message")
    ch.add_argument("--file", metavar="DOC", type=Path, default=None,
                    help="read this UTF-8 document into the memory first (questions follow)")
    ch.add_argument("--load", metavar="FILE", type=Path, default=None,
                    help="continue a conversation saved with /save")
    _add_sampling_options(ch, 512)
    _add_memory_options(ch)
    _add_model_options(ch)

    e = sub.add_parser(
        "eval", help="evaluate on InfiniteBench / LongBench tasks, generated or official",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="\n\n".join(textwrap.fill(paragraph, 88) for paragraph in (
            "Answer every sample greedily in each attention mode and score it with the task's "
            "official metric. passkey, number_string and kv_retrieval are generated here at "
            "--lengths tokens (needle depths evenly spaced); the other tasks read the official "
            "jsonl files from --data-dir (or the Hugging Face hub), and a length is then a "
            "truncation limit.",
            "Predictions are appended to OUT/predictions.jsonl as they come: run the same "
            "command again to resume. OUT also gets summary.json, summary.md and PNG plots.")))
    e.add_argument("--task", required=True, metavar="T[,T...]",
                   help="tasks, comma-separated (e.g. passkey,number_string,kv_retrieval,narrativeqa)")
    e.add_argument("--attention", default="infllm,streaming,full", metavar="MODES",
                   help="attention modes, comma-separated (default infllm,streaming,full)")
    e.add_argument("--lengths", default=None, metavar="N[,N...]",
                   help="prompt lengths in tokens, e.g. 4k,8k,16k,32k (generated tasks: required)")
    e.add_argument("--samples", type=int, default=10, metavar="N",
                   help="samples per task and length (default 10; 0 = every official record)")
    e.add_argument("--seed", type=int, default=0, help="seed of the generated samples (default 0)")
    e.add_argument("--data-dir", default=None, metavar="DIR", help="folder of the official jsonl files")
    e.add_argument("--out", default="eval_out", metavar="DIR", help="output folder (default eval_out)")
    e.add_argument("--max-len", action="append", default=None, metavar="[MODE=]N|none",
                   help="truncate prompts above N tokens, the reference's way (the first 128 and "
                        "the last ones); default: full attention to the model's native window, "
                        "infllm and streaming unlimited (repeatable, e.g. --max-len full=none)")
    e.add_argument("--chunk-size", type=int, default=None, help="prefill tokens per model call")
    e.add_argument("--official", action="store_true",
                   help="read passkey, number_string and kv_retrieval from the official files "
                        "instead of generating them")
    e.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    e.add_argument("--report-only", action="store_true",
                   help="write the summary and plots from the predictions in --out, running nothing")
    _add_memory_options(e)
    _add_model_options(e)
    return parser


def _read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    return _read_text(args.prompt_file, "prompt file")


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise InfLLMLiteError(f"{what} {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InfLLMLiteError(f"{what} {path} is not UTF-8 text (byte {e.start})") from e


def _stream_to_stdout(pieces) -> int:
    n_chars = 0
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        n_chars += len(piece)
    sys.stdout.write("\n")
    return n_chars


def cmd_generate(args) -> None:
    from .generate import generate
    prompt = _read_prompt(args)
    if not prompt.strip():
        raise InfLLMLiteError("the prompt is empty")
    if args.max_new_tokens < 1:
        raise InfLLMLiteError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model, tokenizer = load_from_args(args)
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = messages + [{"role": "user", "content": prompt}]
    memory = memory_config_from_args(args, model)
    pieces, stats = generate(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, memory=memory,
                             attention=args.attention, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, seed=args.seed, stop=args.stop, stream=True,
                             chunk_size=args.chunk_size, compile=args.compile,
                             attention_kernel=args.attention_kernel, return_stats=True)
    _stream_to_stdout(pieces)
    if args.stats:
        print(stats.summary(), file=sys.stderr)


def cmd_convert(args) -> None:
    from .weights.gguf import convert_gguf
    out = convert_gguf(args.gguf, args.out_dir, progress=True)
    print(f"wrote {out}")


def cmd_demo(args) -> None:
    if args.question is not None:
        return _demo_question(args)
    from .eval.passkey import make_passkey_sample, score_passkey
    from .generate import encode_prompt
    from .memory_config import MemoryConfig

    if args.length < 1:
        raise InfLLMLiteError(f"--length must be at least 1, got {args.length}")
    if not 0.0 <= args.depth <= 1.0:
        raise InfLLMLiteError(f"--depth must be in [0, 1], got {args.depth}")
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
    answer, seconds, prefill_tps = _demo_run(model, tokenizer, prompt_ids, args.attention, None)
    _demo_report(answer, sample.key, seconds, prefill_tps, score_passkey)

    if args.no_full or args.attention == "full":
        return
    reason = _full_attention_skip_reason(model, prompt_ids, native)
    if reason:
        print(f"\n[full attention] skipped: {reason}")
        return
    print(f"\n[full attention] reading the same {sample.n_tokens} tokens ...", flush=True)
    answer, seconds, prefill_tps = _demo_run(model, tokenizer, prompt_ids, "full", FULL_CHUNK)
    _demo_report(answer, sample.key, seconds, prefill_tps, score_passkey)


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


def _demo_question(args) -> None:
    """The short demo: one question, the answer streamed."""
    from .generate import encode_prompt, generate_ids
    model, tokenizer = load_from_args(args)
    messages = [{"role": "user", "content": args.question}]
    prompt_ids = encode_prompt(tokenizer, messages)
    print(f"question: {args.question}\nanswer: ", end="", flush=True)
    decoder = tokenizer.incremental_decoder()
    stop_ids = set(tokenizer.stop_token_ids) | set(model.args.eos_token_ids)
    start, n_tokens = time.perf_counter(), 0
    for token_id in generate_ids(model, prompt_ids, max_new_tokens=128, stop_token_ids=stop_ids):
        print(decoder.add(token_id), end="", flush=True)
        n_tokens += 1
    print(decoder.flush())
    seconds = time.perf_counter() - start
    print(f"[{len(prompt_ids)} prompt tokens, {n_tokens} new tokens in {seconds:.1f} s]")


def _demo_run(model, tokenizer, prompt_ids, attention, chunk_size):
    """Greedy answer (16 tokens at most) with a prefill progress bar; returns the answer,
    the total seconds and the prefill speed (prompt tokens / time to the first new token)."""
    from .generate import generate
    start = time.perf_counter()
    answer, stats = generate(model, tokenizer, prompt_ids, max_new_tokens=16, attention=attention,
                             chunk_size=chunk_size, progress=True, return_stats=True)
    return answer.strip(), time.perf_counter() - start, stats.prefill_tokens_per_second


def _demo_report(answer, key, seconds, prefill_tps, score) -> None:
    print(f"answer:   {answer}")
    print(f"true key: {key}  ->  {'RIGHT' if score(answer, key) else 'WRONG'}")
    print(f"time:     {seconds:.1f} s (prefill {prefill_tps:.0f} tokens/s)", flush=True)


def _full_attention_skip_reason(model, prompt_ids, native) -> str | None:
    """Why full attention is not run at this length (None: run it): more than 4x the native
    window, or an estimated time above FULL_BUDGET_S."""
    n = len(prompt_ids)
    if n <= FULL_PROBE:
        return None
    too_long = n > 4 * native
    seconds, basis = _full_attention_estimate(model, prompt_ids)
    estimate = f"about {_minutes(seconds)} here ({basis})"
    if too_long:
        return (f"{n} tokens is more than 4x the model's native window of {native}: full attention "
                f"would read positions it never saw in training, and it would take {estimate}")
    if seconds > FULL_BUDGET_S:
        return (f"it would take {estimate}, more than this demo's "
                f"{FULL_BUDGET_S // 60}-minute limit")
    return None


def _full_attention_estimate(model, prompt_ids) -> tuple[float, str]:
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


def cmd_eval(args) -> None:
    from .eval.command import run_eval_command
    run_eval_command(args)


def cmd_chat(args) -> None:
    from .chat import ChatSession
    from .chat_cli import run_chat
    if args.file is not None:
        document = _read_text(args.file, "document")
    model, tokenizer = load_from_args(args)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed, kernel=args.attention_kernel)
    if args.load is not None:
        session = ChatSession.load(args.load, model, tokenizer, **options)
        print(f"loaded {session.state.length} tokens and {len(session.messages)} messages from {args.load}")
    else:
        session = ChatSession(model, tokenizer, attention=args.attention, system=args.system,
                              memory=memory_config_from_args(args, model), **options)
    if args.file is not None:
        n = session.read(document, progress=True)
        print(f"read {args.file} ({n} tokens)")
    run_chat(session)


COMMANDS = {"chat": cmd_chat, "generate": cmd_generate, "convert": cmd_convert, "demo": cmd_demo, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except InfLLMLiteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
