"""A million-token passkey: the embedded model reads one InfiniteBench passkey haystack of
``--tokens`` tokens (default 1,048,576) with InfLLM and answers it (issue 21).

    python bench/million_tokens.py --tokens 1048576 --depth 0.5 --kv-dtype bfloat16 \\
        --max-host-bytes 8GiB --offload-dir /var/tmp --out docs/results/million_tokens_smollm2.json

The sample is the eval's passkey (``make_passkey_sample``, seed ``--seed``); the memory is
``MemoryConfig.for_model`` with the storage options given here (a bfloat16 store and a host
budget so that the blocks that do not fit go to the disk tier). Records the answer, the
time to build the prompt, prefill and decode time, peak RSS (``ru_maxrss``), the bytes the
disk tier held and moved, and the pools' counters; writes them to ``--out`` (JSON).
Not a CI test: about an hour on 2 CPU threads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from infllm_lite import GenerationStats, MemoryConfig, generate_ids, load_model
from infllm_lite.eval.passkey import make_passkey_sample, score_passkey
from infllm_lite.generate import encode_prompt, stop_token_ids
from infllm_lite.options import KV_DTYPES, parse_bytes

sys.path.insert(0, str(Path(__file__).parent))  # bench/: roofline.py
from roofline import machine_info  # noqa: E402


def directory_bytes(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (sparse files count what they hold)."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1 << 20)
    p.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1] (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-dtype", default="bfloat16", choices=KV_DTYPES)
    p.add_argument("--max-host-bytes", type=parse_bytes, default=parse_bytes("8GiB"),
                   help="host budget of the block store; the rest goes to disk (default 8GiB)")
    p.add_argument("--offload-dir", type=Path, default=None,
                   help="where the disk tier's files go (default: a temporary directory)")
    p.add_argument("--topk", type=int, default=None, help="blocks retrieved (default: for_model's)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("million_tokens.json"))
    args = p.parse_args(argv)

    model, tokenizer = load_model()
    overrides = dict(kv_dtype=args.kv_dtype, max_host_bytes=args.max_host_bytes)
    if args.topk is not None:
        overrides["topk"] = args.topk
    workdir = Path(tempfile.mkdtemp(prefix="million-", dir=args.offload_dir))
    memory = MemoryConfig.for_model(model.args, offload_dir=str(workdir), **overrides)

    t0 = time.perf_counter()
    sample = make_passkey_sample(tokenizer, args.tokens, args.depth, args.seed)
    prompt_ids = encode_prompt(tokenizer, sample.messages)
    build_seconds = time.perf_counter() - t0
    print(f"prompt: {len(prompt_ids)} tokens, needle at token {sample.needle_token}, "
          f"built in {build_seconds:.1f} s", flush=True)

    stats = GenerationStats()
    t1 = time.perf_counter()
    try:
        new_ids, disk_peak = [], 0
        for token_id in generate_ids(model, prompt_ids, max_new_tokens=args.max_new_tokens,
                                     attention="infllm", memory=memory, progress=True,
                                     stop_token_ids=stop_token_ids(model, tokenizer), stats=stats):
            if not new_ids:  # the prompt's blocks are all stored; once the generator ends, its
                disk_peak = directory_bytes(workdir)  # pools close and remove their files
            new_ids.append(token_id)
    finally:
        total_seconds = time.perf_counter() - t1
        shutil.rmtree(workdir, ignore_errors=True)
    answer = tokenizer.decode(new_ids, skip_special_tokens=True)
    correct = score_passkey(answer, sample.key)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "memory": asdict(memory),
        "prompt_tokens": len(prompt_ids), "depth": args.depth, "seed": args.seed,
        "needle_token": sample.needle_token, "key": sample.key, "answer": answer, "correct": correct,
        "build_seconds": build_seconds, "generate_seconds": total_seconds,
        "peak_rss_bytes": peak_rss, "disk_bytes": disk_peak,
        "stats": stats.to_dict(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(stats.summary())
    print(f"key {sample.key}, answer {answer!r}: {'correct' if correct else 'WRONG'}; "
          f"{total_seconds / 60:.1f} min, peak RSS {peak_rss / 2**30:.2f} GiB, "
          f"disk {disk_peak / 2**30:.2f} GiB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
