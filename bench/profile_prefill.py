"""Where one prefill's time goes: ``torch.profiler``'s operator table for a generation of
one token from a passkey haystack (``transformers``: its forward over the prompt, the same
weights), after an untimed warm generation (which compiles).

    python bench/profile_prefill.py --mode infllm --length 4096 [--threads 1] [--rows 25]

Compare modes in one sitting (the shares, not the absolute times, are the result when
the machine is busy).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="infllm", choices=("infllm", "streaming", "full", "transformers"))
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args(argv)

    from infllm_lite import MemoryConfig, ModelArgs, Tokenizer
    from infllm_lite.weights.embedded import embedded_model_dir

    sys.path.insert(0, str(Path(__file__).parent))
    from scaling import make_runner, prompt_ids  # the benchmark's own prefill

    torch.set_num_threads(args.threads)
    folder = embedded_model_dir(progress=False)
    ids = prompt_ids(Tokenizer.from_dir(folder), args.length)
    memory = MemoryConfig.for_model(ModelArgs.from_hf_config(json.loads((folder / "config.json").read_text())))
    run = make_runner(args.mode, folder, memory, len(ids) + 8, args.threads)

    def prefill():
        run(ids, 0)

    with torch.inference_mode():
        prefill()  # warm-up: compiles
        start = time.perf_counter()
        prefill()
        print(f"{args.mode}: {len(ids)} tokens prefilled in {time.perf_counter() - start:.1f} s "
              f"({args.threads} threads)")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            prefill()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
