"""Load test of ``infllm-lite serve``: throughput (requests/s, output tok/s) and latency
(time to first token, time per output token; p50 and p95) at 1, 4 and 16 concurrent
streaming clients, per attention mode, on localhost.

    python bench/serve_load.py --clients 1,4,16 --modes full,infllm --out docs/results/serve_load_smollm2

The script starts its own server (``infllm-lite serve`` on a free 127.0.0.1 port, the
embedded model unless ``--server-args`` says otherwise; ``--url`` uses a running one on
this machine instead, never another host). A cell is (mode, C clients): C clients, each
sending ``--requests`` streamed ``/v1/completions`` requests one after another (greedy,
``max_tokens`` ``--max-tokens``, the mode by the ``attention`` extension; each request its
own prompt of exactly ``--prompt-tokens`` token ids: consecutive windows of
``bench/batch_decode.py``'s deterministic text, no two alike). Per request: time to the
first text chunk, and (last chunk - first chunk) / (tokens - 1) per output token, the
tokens from the stream's ``usage``. Per cell: requests / wall seconds and output tokens /
wall seconds, wall from the first request sent to the last answer. Each mode is warmed
up first (one request, untimed). Bounded: a cell stops sending new requests after
``--cell-seconds``, each request has a timeout, the server is always stopped.

Writes ``serve_load.json`` (settings, every request, the cells), ``serve_load.md`` (the
table) and ``serve_load.png`` (output tok/s and TTFT against clients) to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

sys.path.insert(0, str(Path(__file__).parent))  # bench/: batch_decode's prompts

from batch_decode import make_prompts  # noqa: E402

from infllm_lite.server.process import ServerProcess  # noqa: E402

TARGET = 3.0  # output tok/s at the most clients over one client (issue 18)


def ints(text: str) -> list[int]:
    values = sorted({int(x) for x in text.split(",") if x.strip()})
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"want positive integers separated by commas, got {text!r}")
    return values


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


async def one_request(client: httpx.AsyncClient, model: str, mode: str, prompt: list[int], max_tokens: int,
                      timeout: float) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "attention": mode}
    start, first, last, tokens, error = time.perf_counter(), None, None, 0, None
    try:
        async with client.stream("POST", "/v1/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    data = json.loads(line[6:])
                    if data.get("usage"):
                        tokens = data["usage"]["completion_tokens"]
                    elif data.get("choices") and data["choices"][0]["text"]:
                        now = time.perf_counter()
                        first = first if first is not None else now
                        last = now
                    elif "error" in data:
                        error = data["error"]["message"]
    except (httpx.HTTPError, asyncio.TimeoutError) as e:
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    return {"start": start, "end": end, "tokens": tokens, "error": error,
            "ttft_s": None if first is None else first - start,
            "tpot_s": (last - first) / (tokens - 1) if first is not None and tokens > 1 else None}


async def run_cell(base: str, headers: dict, model: str, mode: str, clients: int, requests: int,
                   prompts: list[list[int]], max_tokens: int, cell_seconds: float, timeout: float) -> dict:
    queue = list(prompts)
    deadline = time.perf_counter() + cell_seconds
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits) as client:
        async def worker() -> list[dict]:
            done = []
            for _ in range(requests):
                if not queue or time.perf_counter() > deadline:
                    break
                done.append(await one_request(client, model, mode, queue.pop(), max_tokens, timeout))
            return done

        t0 = time.perf_counter()
        rows = [r for rs in await asyncio.gather(*(worker() for _ in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    return summarize(mode, clients, rows, wall)


def summarize(mode: str, clients: int, rows: list[dict], wall: float) -> dict:
    ok = [r for r in rows if r["error"] is None]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tpot = [r["tpot_s"] for r in ok if r["tpot_s"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {"mode": mode, "clients": clients, "requests": len(rows), "errors": len(rows) - len(ok),
            "wall_s": wall, "requests_per_s": len(ok) / wall if wall else 0.0,
            "output_tok_per_s": tokens / wall if wall else 0.0, "output_tokens": tokens,
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
            "tpot_p50_ms": None if not tpot else 1000 * percentile(tpot, 0.5),
            "tpot_p95_ms": None if not tpot else 1000 * percentile(tpot, 0.95),
            "first_error": next((r["error"] for r in rows if r["error"]), None), "rows": rows}


def _f(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(cells: list[dict], settings: dict) -> str:
    lines = ["| mode | clients | requests/s | output tok/s | × 1 client | TTFT p50 | TTFT p95 | "
             "per token p50 | per token p95 | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        one = next((x for x in cells if x["mode"] == c["mode"] and x["clients"] == min(
            y["clients"] for y in cells if y["mode"] == c["mode"])), None)
        ratio = c["output_tok_per_s"] / one["output_tok_per_s"] if one and one["output_tok_per_s"] else None
        mark = ""
        if ratio is not None and c["clients"] == max(y["clients"] for y in cells) and c is not one:
            mark = f" (goal ≥ {TARGET:.0f}x{'' if ratio >= TARGET else ': missed'})"
        lines.append(f"| {c['mode']} | {c['clients']} | {c['requests_per_s']:.2f} | {c['output_tok_per_s']:.1f} | "
                     f"{_f(ratio, '.2f')}x{mark} | {_f(c['ttft_p50_s'], '.2f')} s | {_f(c['ttft_p95_s'], '.2f')} s | "
                     f"{_f(c['tpot_p50_ms'], '.0f')} ms | {_f(c['tpot_p95_ms'], '.0f')} ms | {c['errors']} |")
    lines.append("")
    lines.append(f"{settings['prompt_tokens']}-token prompts, {settings['max_tokens']} new tokens, "
                 f"{settings['requests']} requests per client, greedy, streamed /v1/completions on localhost.")
    return "\n".join(lines) + "\n"


def plot(path: Path, cells: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in dict.fromkeys(c["mode"] for c in cells):
        xs = [c for c in cells if c["mode"] == mode]
        a.plot([c["clients"] for c in xs], [c["output_tok_per_s"] for c in xs], "o-", label=mode)
        b.plot([c["clients"] for c in xs], [c["ttft_p50_s"] or 0 for c in xs], "o-", label=mode)
    for ax, title in ((a, "output tok/s"), (b, "time to first token, p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=ints, default=[1, 4, 16], help="concurrent clients per cell (default 1,4,16)")
    p.add_argument("--modes", default="full,infllm", help="attention modes (default full,infllm)")
    p.add_argument("--requests", type=int, default=4, help="requests per client per cell (default 4)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length in tokens (default 512)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default 64)")
    p.add_argument("--cell-seconds", type=float, default=300.0,
                   help="no new request after this long in a cell (default 300)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request at most (default 600)")
    p.add_argument("--url", default=None, help="a running server on this machine (default: start one)")
    p.add_argument("--api-key", default=None, help="its key, if it needs one")
    p.add_argument("--server-args", default="", help="extra options for the started server, one string")
    p.add_argument("--out", type=Path, required=True, help="folder for serve_load.json, .md, .png")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.url is not None and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        p.error("--url must be a server on this machine (127.0.0.1, localhost or ::1)")
    args.out.mkdir(parents=True, exist_ok=True)
    from infllm_lite.tokenizer import Tokenizer
    from infllm_lite.weights.embedded import embedded_model_dir
    tokenizer = Tokenizer.from_dir(embedded_model_dir(progress=False))
    n_prompts = (1 + sum(args.clients) * args.requests) * len(modes)
    prompts = make_prompts(tokenizer, n_prompts, args.prompt_tokens)
    server = None
    if args.url is None:
        server = ServerProcess(args.server_args.split(), log=args.out / "server.log").start()
        base = server.base
    else:
        base = args.url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "api_key")}
    settings.update(modes=modes, started=datetime.datetime.now().isoformat(timespec="seconds"),
                    machine=platform.platform(), python=platform.python_version())
    cells = []
    try:
        model = httpx.get(base + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
        settings["model"] = model
        for mode in modes:
            warm = asyncio.run(run_cell(base, headers, model, mode, 1, 1, [prompts.pop()], 4, args.cell_seconds,
                                        args.timeout))
            if warm["errors"]:
                raise SystemExit(f"error: the warm-up request in mode {mode} failed: {warm['first_error']}")
            for clients in args.clients:
                take = [prompts.pop() for _ in range(clients * args.requests)]
                cell = asyncio.run(run_cell(base, headers, model, mode, clients, args.requests, take,
                                            args.max_tokens, args.cell_seconds, args.timeout))
                cells.append(cell)
                print(f"{mode:>9} {clients:>3} clients: {cell['output_tok_per_s']:.1f} tok/s, "
                      f"{cell['requests_per_s']:.2f} req/s, TTFT p50 {_f(cell['ttft_p50_s'], '.2f')} s, "
                      f"{cell['errors']} errors", flush=True)
    finally:
        if server is not None:
            server.stop()
    report = {"settings": settings, "cells": cells}
    (args.out / "serve_load.json").write_text(json.dumps(report, indent=1))
    table = markdown(cells, settings)
    (args.out / "serve_load.md").write_text(table)
    plot(args.out / "serve_load.png", cells)
    print(table)
    return 0 if all(c["errors"] == 0 for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
