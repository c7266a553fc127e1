"""The ``infllm-lite`` command line: generate, convert, demo."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import InfLLMLiteError

DTYPES = ("float32", "bfloat16", "float16")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="SRC", default=None,
                   help="a Hugging Face model folder, a hub id (owner/name[@rev]) or a .gguf file; "
                        "default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype (default: float32 on the CPU, bfloat16 on GPUs)")


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="stop after N new tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k best tokens (default 0: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop before this string (repeatable)")
    p.add_argument("--attention", default="full", help="attention mode (default: full)")
    p.add_argument("--chunk-size", type=int, default=8192, help="prefill tokens per model call")
    p.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile")


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

    d = sub.add_parser("demo", help="a short answer from the embedded model",
                       description="Ask the embedded SmolLM2-135M-Instruct a question and stream its answer.")
    d.add_argument("--question", default="What is the capital of France? Answer in one sentence.")
    _add_model_options(d)
    return parser


def _read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    path: Path = args.prompt_file
    if not path.is_file():
        raise InfLLMLiteError(f"prompt file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InfLLMLiteError(f"prompt file {path} is not UTF-8 text (byte {e.start})") from e


def _load(args):
    import torch

    from .loading import load_model
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return load_model(args.model, dtype=dtype, device=args.device)


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
    model, tokenizer = _load(args)
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = messages + [{"role": "user", "content": prompt}]
    pieces = generate(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens,
                      attention=args.attention, temperature=args.temperature, top_p=args.top_p,
                      top_k=args.top_k, seed=args.seed, stop=args.stop, stream=True,
                      chunk_size=args.chunk_size, compile=args.compile)
    _stream_to_stdout(pieces)


def cmd_convert(args) -> None:
    from .weights.gguf import convert_gguf
    out = convert_gguf(args.gguf, args.out_dir, progress=True)
    print(f"wrote {out}")


def cmd_demo(args) -> None:
    from .generate import encode_prompt, generate_ids
    model, tokenizer = _load(args)
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


COMMANDS = {"generate": cmd_generate, "convert": cmd_convert, "demo": cmd_demo}


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
