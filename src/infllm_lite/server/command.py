"""``infllm-lite serve`` from its parsed options: the checks before any work, the model,
the application, uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import sys
from pathlib import Path

from ..cli_support import check_writable_dir, load_from_args
from ..errors import InfLLMLiteError
from .settings import ServerSettings

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
GRACEFUL_SHUTDOWN_S = 10  # a shutdown waits this long for open streams, then ends them


def model_name(source: str | None) -> str:
    """The id clients name: the embedded model's, a hub id as given, a folder's or file's name."""
    if source is None:
        return EMBEDDED_NAME
    path = Path(source)
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name
    return source.split("@")[0]


def api_keys(args) -> tuple[str, ...]:
    keys = list(args.api_key or [])
    if args.api_key_file is not None:
        try:
            lines = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise InfLLMLiteError(f"--api-key-file {args.api_key_file}: {e.strerror or e}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        if not keys:
            raise InfLLMLiteError(f"--api-key-file {args.api_key_file} holds no key")
    for key in keys:
        if len(key) < 8 or any(c.isspace() for c in key):
            raise InfLLMLiteError("an API key must be at least 8 characters, without spaces")
    return tuple(keys)


def check_serve_args(args) -> ServerSettings:
    """Everything the options say, checked before the model loads."""
    if not 0 <= args.port <= 65535:
        raise InfLLMLiteError(f"--port must be in 0..65535, got {args.port}")
    for flag, value in (("--max-prompt-tokens", args.max_prompt_tokens), ("--max-queue", args.max_queue),
                        ("--max-body-bytes", args.max_body_bytes), ("--memory-budget", args.memory_budget)):
        if value is not None and value < 1:
            raise InfLLMLiteError(f"{flag} must be at least 1, got {value}")
    if args.snapshot_dir is not None:
        check_writable_dir(args.snapshot_dir, "--snapshot-dir")
    if args.offload_dir is not None:
        check_writable_dir(args.offload_dir, "--offload-dir", create=False)
    from ..cli_support import MEMORY_OPTIONS
    memory = {k: getattr(args, k) for k in MEMORY_OPTIONS if getattr(args, k) is not None}
    return ServerSettings(
        model_name=args.model_name or model_name(args.model), attention=args.attention, memory=memory,
        memory_budget=args.memory_budget, max_sequences=args.max_sequences, step_tokens=args.step_tokens,
        attention_kernel=args.attention_kernel or "auto", max_queue=args.max_queue,
        max_prompt_tokens=args.max_prompt_tokens, max_body_bytes=args.max_body_bytes, api_keys=api_keys(args),
        snapshot_dir=None if args.snapshot_dir is None else Path(args.snapshot_dir))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_serve(args) -> None:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise InfLLMLiteError(f"serve needs the serve extra ({e.name} is missing): "
                              'pip install "infllm-lite[serve]"') from None
    settings = check_serve_args(args)
    if not settings.api_keys and not _is_loopback(args.host):
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it may use it",
              file=sys.stderr)
    model, tokenizer = load_from_args(args)
    from ..memory_config import MemoryConfig
    MemoryConfig.for_model(model.args, **settings.memory)  # a bad combination, refused before serving
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    config = dict(host=args.host, port=args.port, log_level=args.log_level,
                  timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    if getattr(args, "tensor_parallel", False):  # under torchrun: rank 0 serves, the others follow
        from ..parallel.serve import serve_tensor_parallel
        serve_tensor_parallel(model, tokenizer, settings, config, announce=lambda: announce(settings, args))
        return
    app = create_app(model, tokenizer, settings)
    announce(settings, args)
    uvicorn.run(app, **config)


def announce(settings: ServerSettings, args) -> None:
    budget = "unlimited" if settings.memory_budget is None else f"{settings.memory_budget / 2**30:.2f} GiB"
    if getattr(args, "tensor_parallel", False):
        budget += " per rank"
    print(f"serving {settings.model_name} on http://{args.host}:{args.port} (attention {settings.attention} "
          f"by default, memory budget {budget}, conversations "
          f"{'saved in ' + str(settings.snapshot_dir) if settings.snapshot_dir else 'in memory only'}"
          f"{', API keys required' if settings.api_keys else ''})", file=sys.stderr, flush=True)
