"""The ``infllm-lite`` command line: generate, convert, demo, eval, chat, serve (the parser
and thin commands; the demo lives in ``demo.py``, eval's body in ``eval/command.py``,
serve's in ``server/command.py``)."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from .cli_support import (MEMORY_OPTIONS, check_numbers, check_options_apply, check_writable_dir, flag,
                          known_modes, load_from_args, memory_config_from_args)
from .demo import DEMO_LENGTH, DEMO_LENGTH_NOTE, FULL_BUDGET_S
from .errors import InfLLMLiteError
from .eval.files import write_atomic
from .options import (ATTENTION_KERNELS, ATTENTION_MODES, CACHE_POLICIES, DEFAULT_CHUNK_SIZE, KV_DTYPES,
                      QUANTIZE_CHOICES, parse_bytes)
from .prompt_files import PromptEntry, read_prompt_file, read_prompts_jsonl, read_text_file

DTYPES = ("float32", "bfloat16", "float16")
EMBEDDED_NATIVE_WINDOW = 8192  # the embedded SmolLM2-135M-Instruct's max_position_embeddings
HELP_LINE = "Inside: /reset, /save FILE, /load FILE, /stats, /help, /exit; Ctrl-C stops an answer."
COMPILE_NOTE = ("compiling the decode step with torch.compile (first use: about a minute; "
                "cached on disk for later runs) ...")


def _size(text: str) -> int:
    """argparse type for byte sizes (options.parse_bytes)."""
    try:
        return parse_bytes(text)
    except InfLLMLiteError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="SRC", default=None,
                   help="a Hugging Face model folder, a hub id (owner/name[@rev]) or a .gguf file; "
                        "default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype (default: float32 on the CPU, bfloat16 on GPUs)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                   help="weight-only quantized linear layers: int8 (per channel), int4 (groups of "
                        "--group-size), gguf (a GGUF file's Q8_0/Q4_0/Q4_1/Q4_K/Q6_K blocks kept packed); "
                        "default: float weights")
    p.add_argument("--group-size", type=int, default=None, metavar="G",
                   help="int4's group size: 32 (default), 64 or 128")


def _add_sampling_options(p: argparse.ArgumentParser, max_new_tokens: int, why: str) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                   help=f"stop after N new tokens (default {max_new_tokens}: {why})")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample among the K best tokens (default 0: off)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed for sampling (default: none, a fresh draw each run)")


def _add_memory_options(p: argparse.ArgumentParser) -> None:
    from .config import ModelArgs
    from .memory_config import MemoryConfig
    m = MemoryConfig.for_model(ModelArgs(max_position_embeddings=EMBEDDED_NATIVE_WINDOW))
    from .memory_presets import PRESETS
    g = p.add_argument_group(
        "memory (streaming and lm-infinite use --n-init and --n-local, infllm all; the defaults follow "
        f"the model's native window, given here for SmolLM2's {EMBEDDED_NATIVE_WINDOW} tokens)")
    g.add_argument("--memory-preset", default=None, choices=sorted(PRESETS), metavar="NAME",
                   help="start from a named configuration, the InfLLM paper's or its repository's, checked "
                        "against the model (the options below override it; default: none, the model's "
                        "own default): " + ", ".join(sorted(PRESETS)))
    for name, meaning in (
            ("n-init", f"initial (sink) tokens (default: 128, at most half the local window; "
                       f"SmolLM2: {m.n_init})"),
            ("n-local", f"local window in tokens (default: 1/16 of the native window, 256 to 4096; "
                        f"SmolLM2: {m.n_local})"),
            ("block-size", f"tokens per memory block (default {m.block_size})"),
            ("topk", f"blocks retrieved per chunk (default: as many blocks as the local window "
                     f"holds, 2 to 16; SmolLM2: {m.topk})"),
            ("repr-topk", f"representative tokens averaged into a block's retrieval vector "
                          f"(default {m.repr_topk}, at most --block-size)"),
            ("max-cached-blocks", f"fast-tier block slots per layer (default: 32, at least --topk; "
                                  f"SmolLM2: {m.max_cached_blocks})")):
        g.add_argument(f"--{name}", type=int, default=None, metavar="N", help=meaning)
    g.add_argument("--cache-policy", choices=CACHE_POLICIES, default=None,
                   help=f"which cached block the fast tier evicts (default {m.cache_policy})")
    g.add_argument("--kv-dtype", choices=KV_DTYPES, default=None,
                   help="how the memory stores the keys and values it keeps (infllm: its blocks in host "
                        "memory and on disk; streaming, lm-infinite: sinks and window); bfloat16 or float16 "
                        "halve that memory, attention is computed in float32 (default: the model's dtype)")
    g.add_argument("--max-host-bytes", type=_size, default=None, metavar="SIZE",
                   help="host memory for memory blocks, all layers (e.g. 8GiB); older blocks go to "
                        "a file on disk (default: unlimited, no disk)")
    g.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="existing directory of the offload file (default: a temporary directory, "
                        "removed after)")
    g.add_argument("--attention-kernel", default=None, choices=ATTENTION_KERNELS,
                   help="how infllm computes attention: auto (the default: window on the CPU, flex on "
                        "a GPU), window (compiled dense attention over each query tile's key "
                        "window), flex (compiled FlexAttention), window-eager, flex-eager, or torch "
                        "(plain, every logit materialised: for debugging)")


class _PromptOption(argparse.Action):
    """--prompt, --prompt-file, --prompts-jsonl: each appends (its kind, its value) to
    ``args.prompts``, so the prompts keep the command line's order."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), (self.const, values)])


def _add_batch_options(p: argparse.ArgumentParser) -> None:
    b = p.add_argument_group("batch (several prompts, --prompts-jsonl or --output: one "
                             "continuous-batching engine)")
    b.add_argument("--output", metavar="FILE.jsonl", type=Path, default=None,
                   help="write one JSON line per prompt, in input order: id, index, text, "
                        "finish_reason, stats (the file written whole at the end; its folder must "
                        "exist; default: the answers on stdout)")
    _add_engine_options(b)


def _add_engine_options(b) -> None:
    from .engine import DEFAULT_STEP_TOKENS
    b.add_argument("--memory-budget", type=_size, default=None, metavar="SIZE",
                   help="attention memory of the sequences running at once (e.g. 4GiB); a prompt "
                        "waits, in arrival order, until its predicted memory fits (default: unlimited)")
    b.add_argument("--max-sequences", type=int, default=None, metavar="N",
                   help="sequences running at once at most (default: unlimited)")
    b.add_argument("--step-tokens", type=int, default=None, metavar="N",
                   help="tokens per engine step: one per decoding sequence, prompt chunks in the "
                        f"rest (default {DEFAULT_STEP_TOKENS})")


def _with_paragraphs(sub, name: str, help: str, *paragraphs: str) -> argparse.ArgumentParser:
    """A subcommand whose description is several paragraphs, each wrapped at 88 columns."""
    return sub.add_parser(name, help=help, formatter_class=argparse.RawDescriptionHelpFormatter,
                          description="\n\n".join(textwrap.fill(p, 88) for p in paragraphs))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infllm-lite",
        description="Long-context inference with InfLLM context memory, in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    g = _with_paragraphs(
        sub, "generate", "continue a prompt (or answer it with --chat), or many at once",
        "Generate text from a prompt and stream it to stdout.",
        "Every --prompt, --prompt-file and line of a --prompts-jsonl file is a prompt, in the "
        "order given (the options repeat and mix). One prompt (a --prompt or a --prompt-file) "
        "streams its answer alone. Several prompts, a --prompts-jsonl file or --output run "
        "together through one continuous-batching engine (the batch options below); each "
        "answer is printed under a header line '==> NAME <==' in input order (NAME: the "
        "jsonl id, the prompt file, else 'prompt INDEX', counted from 0), or written to "
        "--output. Greedy or seeded, each answer is the one its prompt gets alone.")
    g.add_argument("--prompt", metavar="TEXT", dest="prompts", action=_PromptOption, const="text",
                   help="a prompt (repeatable; default: none)")
    g.add_argument("--prompt-file", metavar="FILE", dest="prompts", action=_PromptOption, const="file",
                   type=Path, help="a UTF-8 file holding one prompt (repeatable; default: none)")
    g.add_argument("--prompts-jsonl", metavar="FILE", dest="prompts", action=_PromptOption,
                   const="jsonl", type=Path,
                   help='one prompt per line: {"prompt": TEXT} or {"messages": [{"role": ..., '
                        '"content": ...}, ...]} (a whole conversation, as given), optionally with '
                        'an "id" naming it in the output (repeatable; default: none)')
    g.add_argument("--chat", action="store_true",
                   help="send each prompt as a user message through the model's chat template")
    g.add_argument("--system", metavar="TEXT", default=None,
                   help="system message before each text prompt (with --chat; default: none)")
    _add_model_options(g)
    _add_sampling_options(g, 256, "a raw continuation rarely ends by itself, so the cap is what "
                             "stops it; chat's default is 512, a safety cap on answers that end at "
                             "their end-of-turn token")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop before this string (repeatable; default: none)")
    g.add_argument("--attention", default="full", choices=ATTENTION_MODES,
                   help="attention mode (default full: exact, for prompts within the model's native "
                        "window; infllm reads inputs far beyond it; chat defaults to infllm because a "
                        "conversation grows without bound)")
    g.add_argument("--chunk-size", type=int, default=None, metavar="N",
                   help=f"prefill tokens per model call (default {DEFAULT_CHUNK_SIZE})")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print the text as it is generated (the default), or all of it at the end")
    _add_memory_options(g)
    g.add_argument("--compile", action="store_true",
                   help="compile the whole decode step with torch.compile (full attention and "
                        "one prompt only; about a minute the first time)")
    g.add_argument("--stats", action="store_true",
                   help="print speed and memory-tier counters to stderr when done (a batch: the "
                        "engine's summary line)")
    _add_batch_options(g)
    g.add_argument("--tensor-parallel", action="store_true",
                   help="under torchrun --nproc-per-node N: split the model's heads and MLP over the N "
                        "processes (NCCL on CUDA, gloo on the CPU); rank 0 prints")

    c = sub.add_parser("convert", help="convert a GGUF file into a Hugging Face model folder",
                       description="Dequantize a GGUF checkpoint into config.json, model.safetensors "
                                   "(float32), tokenizer.json and tokenizer_config.json.")
    c.add_argument("gguf", type=Path, metavar="FILE.gguf", help="the GGUF checkpoint to convert")
    c.add_argument("out_dir", type=Path, metavar="OUT_DIR",
                   help="the model folder to write (must not exist, or be empty)")

    d = _with_paragraphs(
        sub, "demo", "long-context demo: find a pass key hidden in a long text",
        "Hide a 5-digit pass key in a long text (InfiniteBench's passkey task), ask the model "
        "for it with InfLLM's context memory, then show what full attention answers at the "
        "same length, or why that is skipped (more than 4x the model's native window, or "
        f"more than {FULL_BUDGET_S // 60} minutes estimated).",
        f"The default length, {DEMO_LENGTH} tokens, is {DEMO_LENGTH_NOTE}",
        "--question TEXT gives the short demo instead: one question, the answer streamed.")
    d.add_argument("--length", type=int, default=DEMO_LENGTH, metavar="N",
                   help=f"prompt length in tokens (default {DEMO_LENGTH})")
    d.add_argument("--depth", type=float, default=0.5, metavar="F",
                   help="where the key sits in the text: 0 = start, 1 = end (default 0.5)")
    d.add_argument("--seed", type=int, default=0, metavar="S", help="picks the key (default 0)")
    d.add_argument("--attention", default="infllm", choices=ATTENTION_MODES,
                   help="attention mode that reads the haystack (default infllm)")
    d.add_argument("--no-full", action="store_true",
                   help="do not compare with full attention")
    d.add_argument("--question", metavar="TEXT", default=None,
                   help="instead of the haystack, ask a short question and stream the answer (full "
                        "attention; default: none, the pass-key demo)")
    _add_model_options(d)

    ch = sub.add_parser(
        "chat", help="chat in the terminal; the whole conversation stays in the attention memory",
        description="A terminal chat: answers stream token by token, each turn reads only its new "
                    "tokens, /save and /load keep the memory across sessions. " + HELP_LINE)
    ch.add_argument("--attention", default=None, choices=ATTENTION_MODES,
                    help="attention mode (default infllm: a conversation grows without bound, and "
                         "full attention holds only the model's native window)")
    ch.add_argument("--system", metavar="TEXT", default=None, help="system message (default: none)")
    ch.add_argument("--file", metavar="DOC", type=Path, default=None,
                    help="read this UTF-8 document into the memory first, questions follow "
                         "(default: none)")
    ch.add_argument("--load", metavar="FILE", type=Path, default=None,
                    help="continue a conversation saved with /save (default: a new one)")
    _add_sampling_options(ch, 512, "a safety cap, answers end at their end-of-turn token")
    _add_memory_options(ch)
    _add_model_options(ch)
    ch.add_argument("--tensor-parallel", action="store_true",
                    help="under torchrun --nproc-per-node N: split the model's heads and MLP over the N "
                         "processes; rank 0 reads your lines and prints, /save and /load use a file per "
                         "rank, Ctrl-C ends the chat")

    e = _with_paragraphs(
        sub, "eval", "evaluate on InfiniteBench / LongBench / RULER tasks, generated or official",
        "Answer every sample greedily in each attention mode and score it with the task's "
        "official metric. passkey, number_string and kv_retrieval and RULER's tasks (niah_*, "
        "vt, cwe, fwe, qa_1, qa_2) are generated here at --lengths tokens (needle depths "
        "evenly spaced; RULER's qa reads its documents from --data-dir); the other tasks read the official "
        "jsonl files from --data-dir (or the Hugging Face hub), and a length is then a "
        "truncation limit.",
        "Predictions are appended to OUT/predictions.jsonl as they come: run the same "
        "command again to resume. OUT also gets summary.json, summary.md and PNG plots.")
    e.add_argument("--task", required=True, metavar="T[,T...]",
                   help="tasks, comma-separated (e.g. passkey,number_string,kv_retrieval,narrativeqa)")
    e.add_argument("--attention", default="infllm,streaming,full", metavar="MODES",
                   help="attention modes, comma-separated (default infllm,streaming,full)")
    e.add_argument("--lengths", default=None, metavar="N[,N...]",
                   help="prompt lengths in tokens, e.g. 4k,8k,16k,32k (default: none; the generated "
                        "tasks need them, official records are then truncated to each)")
    e.add_argument("--samples", type=int, default=10, metavar="N",
                   help="samples per task and length (default 10; 0 = every official record)")
    e.add_argument("--seed", type=int, default=0, help="seed of the generated samples (default 0)")
    e.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder of the official jsonl files (default: the Hugging Face hub)")
    e.add_argument("--out", default="eval_out", metavar="DIR", help="output folder (default eval_out)")
    e.add_argument("--max-len", action="append", default=None, metavar="[MODE=]N|none",
                   help="truncate prompts above N tokens, the reference's way (the first 128 and "
                        "the last ones); default: full attention to the model's native window, "
                        "infllm and streaming unlimited (repeatable, e.g. --max-len full=none)")
    e.add_argument("--chunk-size", type=int, default=None, metavar="N",
                   help=f"prefill tokens per model call (default {DEFAULT_CHUNK_SIZE})")
    e.add_argument("--official", action="store_true",
                   help="read passkey, number_string and kv_retrieval from the official files "
                        "instead of generating them (RULER's tasks are always generated)")
    e.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    e.add_argument("--report-only", action="store_true",
                   help="write the summary and plots from the predictions in --out, running nothing")
    _add_memory_options(e)
    _add_model_options(e)
    _add_serve_parser(sub)
    return parser


def _add_serve_parser(sub) -> None:
    from .server.settings import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_MAX_QUEUE
    s = _with_paragraphs(
        sub, "serve", "an OpenAI-compatible HTTP server, with persistent conversations",
        "Serve the model over HTTP: GET /v1/models, POST /v1/completions and /v1/chat/completions "
        "(OpenAI's fields, stream true or false), POST /v1/conversations to keep a conversation's "
        "attention memory on the server between requests (conversation_id on chat requests, "
        "DELETE to end it), GET /health and /metrics (Prometheus). Requests run together "
        "through one continuous-batching engine. Extensions: 'attention' and 'memory' per "
        "request (defaults below). Needs the serve extra: pip install \"infllm-lite[serve]\".",
        "With --api-key every endpoint but /health needs 'Authorization: Bearer KEY'; each key "
        "is a client, and a conversation belongs to the key that created it (others get 404).")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    s.add_argument("--model-name", metavar="NAME", default=None,
                   help="the model id clients name (default: the model's folder, file or hub name; "
                        "SmolLM2-135M-Instruct for the embedded one)")
    s.add_argument("--attention", default="infllm", choices=ATTENTION_MODES,
                   help="a request's attention mode unless it names one (default infllm: any length)")
    s.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require this bearer key (repeatable: one per client; default: none, open)")
    s.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                   help="keys, one a line (kept out of the process list; default: none)")
    s.add_argument("--max-prompt-tokens", type=int, default=DEFAULT_MAX_PROMPT_TOKENS, metavar="N",
                   help=f"longer prompts get 400 before any work (default {DEFAULT_MAX_PROMPT_TOKENS})")
    s.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, metavar="N",
                   help=f"sequences waiting for memory at most; past it 429 (default {DEFAULT_MAX_QUEUE})")
    s.add_argument("--max-body-bytes", type=_size, default=DEFAULT_MAX_BODY_BYTES, metavar="SIZE",
                   help=f"larger request bodies get 413 (default {DEFAULT_MAX_BODY_BYTES >> 20}MiB)")
    s.add_argument("--snapshot-dir", type=Path, default=None, metavar="DIR",
                   help="save conversations here: idle ones are evicted to snapshots when the memory "
                        "budget needs room, and a restart with the same folder keeps them (default: "
                        "none, conversations in memory only)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default info)")
    _add_engine_options(s.add_argument_group("engine"))
    _add_memory_options(s)
    _add_model_options(s)
    s.add_argument("--tensor-parallel", action="store_true",
                   help="under torchrun --nproc-per-node N: split the model's heads and MLP over the N "
                        "processes; rank 0 serves HTTP and every rank steps the same engine (the memory "
                        "budget is per rank, snapshots a file per rank)")


def _check_memory_args(args, modes: list[str]) -> None:
    """Before any work: the options given apply to ``modes``, the offload folder is writable;
    then --attention-kernel gets its default."""
    check_options_apply(args, modes)
    if args.offload_dir is not None:
        check_writable_dir(args.offload_dir, "--offload-dir", create=False)
    args.attention_kernel = args.attention_kernel or "auto"


BATCH_ONLY = ("memory_budget", "max_sequences", "step_tokens")


def _read_prompts(args) -> list[PromptEntry]:
    """Every prompt of the command line, in its order, each file read and checked."""
    if not args.prompts:
        raise InfLLMLiteError("no prompt: give --prompt TEXT, --prompt-file FILE or --prompts-jsonl FILE")
    entries = []
    for kind, value in args.prompts:
        if kind == "text":
            if not value.strip():
                raise InfLLMLiteError("the prompt is empty" if len(args.prompts) == 1
                                      else f"prompt {len(entries)} (a --prompt) is empty")
            entries.append(PromptEntry(text=value))
        elif kind == "file":
            entries.append(read_prompt_file(value))
        else:
            entries.extend(read_prompts_jsonl(value))
    return entries


def _is_batch(args, entries: list[PromptEntry]) -> bool:
    return len(entries) > 1 or args.output is not None or any(k == "jsonl" for k, _ in args.prompts)


def _check_batch_args(args, entries: list[PromptEntry]) -> None:
    """Before the model loads: the batch options only with a batch, --compile only without,
    and --output a file that can be written and is none of the inputs."""
    if not _is_batch(args, entries):
        for dest in BATCH_ONLY:
            if getattr(args, dest) is not None:
                raise InfLLMLiteError(f"{flag(dest)} applies to a batch only: several prompts, "
                                      "--prompts-jsonl or --output (here: one prompt)")
        return
    if args.compile:
        raise InfLLMLiteError(f"--compile applies to a single prompt (here: a batch of {len(entries)})")
    out = args.output
    if out is None:
        return
    if out.is_dir():
        raise InfLLMLiteError(f"--output {out} is a folder, not a file")
    check_writable_dir(out.parent, "--output", create=False)
    for kind, value in args.prompts:
        if kind != "text" and value.resolve() == out.resolve():
            raise InfLLMLiteError(f"--output {out} is also an input (--prompt-file or --prompts-jsonl)")


def _as_prompt(entry: PromptEntry, args):
    """What ``generate`` is given for ``entry``: its conversation, its text, or with --chat
    its text as the user's message (after --system)."""
    if entry.messages is not None:
        return list(entry.messages)
    if not args.chat:
        return entry.text
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return messages + [{"role": "user", "content": entry.text}]


def _stream_to_stdout(pieces) -> int:
    n_chars = 0
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        n_chars += len(piece)
    sys.stdout.write("\n")
    return n_chars


def _print_in_order(pieces, labels: list[str]) -> None:
    """Each answer under its header, in input order: the first unfinished answer streams as
    it comes, later ones are held until it ends. ``pieces``: (index, text) pairs, an empty
    text ending that index's answer."""
    held = [[] for _ in labels]
    done = [False] * len(labels)
    current = 0

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    write(f"==> {labels[0]} <==\n")
    for i, piece in pieces:
        if not piece:
            done[i] = True
        elif i == current:
            write(piece)
        else:
            held[i].append(piece)
        while current < len(labels) and done[current]:
            write("\n")
            current += 1
            if current < len(labels):
                write(f"\n==> {labels[current]} <==\n" + "".join(held[current]))


def _output_line(entry: PromptEntry, index: int, text: str, seq_stats) -> str:
    return json.dumps({"id": index if entry.name is None else entry.name, "index": index, "text": text,
                       "finish_reason": seq_stats.finish_reason, "stats": seq_stats.to_dict()},
                      ensure_ascii=False)


def cmd_generate(args) -> None:
    from .generate import generate
    _check_memory_args(args, [args.attention])
    entries = _read_prompts(args)
    _check_batch_args(args, entries)
    if args.tensor_parallel:
        from .parallel.launch import check_tensor_parallel_args
        check_tensor_parallel_args(args, batch=_is_batch(args, entries))
    model, tokenizer = load_from_args(args)
    options = dict(max_new_tokens=args.max_new_tokens, memory=memory_config_from_args(args, model),
                   attention=args.attention, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed, stop=args.stop, chunk_size=args.chunk_size,
                   attention_kernel=args.attention_kernel, return_stats=True)
    if _is_batch(args, entries):
        _generate_batch(model, tokenizer, entries, args, options)
        return
    if args.compile:
        print(COMPILE_NOTE, file=sys.stderr, flush=True)
    text, stats = generate(model, tokenizer, _as_prompt(entries[0], args), stream=args.stream,
                           compile=args.compile, **options)
    _stream_to_stdout(text if args.stream else [text])
    if args.stats:
        print(stats.summary(), file=sys.stderr)


def _generate_batch(model, tokenizer, entries: list[PromptEntry], args, options: dict) -> None:
    """Every prompt through one engine: the answers on stdout under their headers, or
    --output's lines."""
    from .generate import generate
    stream = args.stream and args.output is None
    result, stats = generate(model, tokenizer, [_as_prompt(e, args) for e in entries], stream=stream,
                             memory_budget=args.memory_budget, max_sequences=args.max_sequences,
                             step_tokens=args.step_tokens, **options)
    labels = [f"prompt {i}" if e.name is None else str(e.name) for i, e in enumerate(entries)]
    if stream:
        _print_in_order(result, labels)
    elif args.output is None:
        _print_in_order(((i, piece) for i, text in enumerate(result) for piece in (text, "")), labels)
    else:
        lines = [_output_line(e, i, text, s)
                 for i, (e, text, s) in enumerate(zip(entries, result, stats.sequences))]
        write_atomic(args.output, "".join(line + "\n" for line in lines))
        print(f"wrote {args.output} ({len(lines)} answers)")
    if args.stats:
        print(stats.summary(), file=sys.stderr)


def cmd_convert(args) -> None:
    from .weights.gguf import convert_gguf
    out = convert_gguf(args.gguf, args.out_dir, progress=True)
    print(f"wrote {out}")


def cmd_demo(args) -> None:
    from .demo import run_demo
    run_demo(args)


def cmd_eval(args) -> None:
    from .eval.command import run_eval_command
    modes = [m.strip() for m in args.attention.split(",") if m.strip()]
    if known_modes(modes):  # unknown ones: the plan's check names them
        _check_memory_args(args, modes)
    args.attention_kernel = args.attention_kernel or "auto"
    if not (args.report_only and not Path(args.out).exists()):  # the report says what is missing
        check_writable_dir(args.out, "--out")
    run_eval_command(args)


def cmd_chat(args) -> None:
    from .chat import ChatSession
    from .chat_cli import run_chat
    from .parallel.model import rank_path
    if args.load is not None:  # the snapshot holds the attention mode, memory and conversation
        for dest in ("attention", "system", *MEMORY_OPTIONS):
            if getattr(args, dest) is not None:
                raise InfLLMLiteError(f"{flag(dest)} does not apply with --load: the snapshot holds "
                                      "the attention mode, its memory settings and the conversation")
        args.attention_kernel = args.attention_kernel or "auto"
    else:
        args.attention = args.attention or "infllm"
        _check_memory_args(args, [args.attention])
    if args.file is not None:
        document = read_text_file(args.file, "document")
    model, tokenizer = load_from_args(args)
    peers = None
    if args.tensor_parallel:  # under torchrun: rank 0 reads, every rank runs each step
        from .parallel.chat import ChatPeers
        peers = ChatPeers(model.tp.group)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed, kernel=args.attention_kernel)
    if args.load is not None:
        error = None
        try:  # a rank's own file; with peers, every rank goes on or none does
            session = ChatSession.load(rank_path(args.load, model), model, tokenizer, **options)
        except InfLLMLiteError as e:
            if peers is None:
                raise
            error = e
        if peers is not None and (message := peers.settle(error)) is not None:
            raise InfLLMLiteError(message)
        print(f"loaded {session.state.length} tokens and {len(session.messages)} messages from {args.load}")
    else:
        session = ChatSession(model, tokenizer, attention=args.attention, system=args.system,
                              memory=memory_config_from_args(args, model), **options)
    if args.file is not None:
        n = session.read(document, progress=True)
        print(f"read {args.file} ({n} tokens)")
    run_chat(session, peers=peers)


def cmd_serve(args) -> None:
    from .server.command import run_serve
    run_serve(args)


COMMANDS = {"chat": cmd_chat, "generate": cmd_generate, "convert": cmd_convert, "demo": cmd_demo, "eval": cmd_eval,
            "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_numbers(args)  # every command: numbers checked before any work
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
