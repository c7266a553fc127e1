"""Tensor parallelism's cost on this machine: per-rank memory and the all-reduces' time
against the attention's, for a random Llama-shaped checkpoint (written once to a temporary
folder), an InfLLM prefill and a few decode steps.

    python bench/tensor_parallel.py                                  # one process, the baseline
    torchrun --nproc-per-node 2 bench/tensor_parallel.py             # 2 ranks (gloo on the CPU)

Each rank prints one JSON line: the bytes of its weights (split and replicated), of its
InfLLM memory after the prefill (``state_bytes``-style sum of the tensors the memory holds),
its peak RSS, and times: the whole prefill and decode, the time inside the attention
memories (InfLLM's ``attend``, the score all-reduce included), the time inside the two
per-layer all-reduces of the tensor-parallel hooks, and inside the per-chunk score
all-reduce, with the number of calls of each. Options: ``--dim --layers --heads --kv-heads
--ffn --vocab --prompt --decode``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from infllm_lite.config import ModelArgs  # noqa: E402
from infllm_lite.memory_config import MemoryConfig  # noqa: E402


def write_checkpoint(folder: Path, config: dict) -> None:
    from safetensors.torch import save_file

    from infllm_lite.models.transformer import Transformer
    args = ModelArgs.from_hf_config(config)
    with torch.device("meta"):
        shapes = Transformer(args)
    g = torch.Generator().manual_seed(0)
    tensors = {("model." + n if n != "lm_head.weight" else n): torch.randn(p.shape, generator=g) * 0.02
               + (1.0 if n.endswith("norm.weight") else 0.0) for n, p in shapes.named_parameters()}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))


def rss_mib() -> float:
    """This process's resident memory now (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_bytes(state) -> int:
    total = 0
    for layer in state.layers:
        for t in (layer.k_rot, layer.k_raw, layer.v, layer.tail_scores, layer.block_repr):
            total += t.numel() * t.element_size()
        total += layer.pool.host_bytes + layer.pool.disk_bytes  # the formed blocks' K/V
    return total


class Clock:
    def __init__(self):
        self.seconds, self.calls = 0.0, 0

    def wrap(self, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t
                self.calls += 1
        return timed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    config = dict(model_type="llama", vocab_size=a.vocab, hidden_size=a.dim, intermediate_size=a.ffn,
                  num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                  max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)
    memory = MemoryConfig(n_init=64, n_local=1024, block_size=64, topk=4, exc_block_size=256,
                          max_cached_blocks=8, chunk_size=1024)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    folder = Path(os.environ.get("TP_BENCH_DIR", Path(tempfile.gettempdir()) / f"infllm_tp_bench_{a.dim}_{a.layers}"))
    rank = int(os.environ.get("RANK", "0"))
    if a.write_only:
        folder.mkdir(parents=True, exist_ok=True)
        write_checkpoint(folder, config)
        return
    if not (folder / "config.json").exists() and rank == 0:  # in a child: its memory is not ours
        import subprocess
        subprocess.run([sys.executable, __file__, "--write-only", *sys.argv[1:]], check=True,
                       env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    from infllm_lite.attention import make_attention_state
    from infllm_lite.attention.infllm import InfLLMLayerAttention
    hooks, scores = Clock(), Clock()
    if distributed:
        import torch.distributed as dist

        from infllm_lite.parallel import build_tp_model, init_distributed
        from infllm_lite.parallel import model as tp_model
        from infllm_lite.parallel.group import all_reduce_sum, barrier
        from infllm_lite.parallel.sharded_load import read_hf_shard
        group = init_distributed("cpu")
        barrier(group)  # rank 0 has written the checkpoint
        world = dist.get_world_size()
        tp_model.all_reduce_sum = lambda x, g: (scores if x.dim() == 2 else hooks).wrap(all_reduce_sum)(x, g)
        args = ModelArgs.from_hf_config(config)
        rss_before = rss_mib()
        model = build_tp_model(args, read_hf_shard(folder, args, rank, world), group)
    else:
        from infllm_lite.models.build import build_model
        from infllm_lite.weights.hf_folder import read_hf_state_dict
        world = 1
        rss_before = rss_mib()
        model = build_model(ModelArgs.from_hf_config(config), read_hf_state_dict(folder))
    rss_loaded = rss_mib()
    split = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "layers." in n and "norm" not in n)
    replicated = sum(p.numel() * p.element_size() for n, p in model.named_parameters()) - split
    attend = Clock()
    InfLLMLayerAttention.attend = attend.wrap(InfLLMLayerAttention.attend)
    ids = torch.randint(0, a.vocab, (1, a.prompt), generator=torch.Generator().manual_seed(1))
    state = make_attention_state("infllm", model.args, capacity=0, memory=memory, kernel="window-eager")
    with torch.inference_mode():
        t = time.perf_counter()
        for s in range(0, a.prompt, memory.chunk_size):
            logits = model(ids[:, s:s + memory.chunk_size], state)
        prefill = time.perf_counter() - t
        rss_prefill = rss_mib()
        marks = (attend.seconds, hooks.seconds, scores.seconds, attend.calls, hooks.calls, scores.calls)
        t = time.perf_counter()
        for _ in range(a.decode):
            logits = model(logits[:, -1:].argmax(-1), state)
        decode = time.perf_counter() - t
    out = dict(world=world, rank=rank, weights_split_MiB=round(split / 2**20, 1),
               weights_replicated_MiB=round(replicated / 2**20, 1),
               infllm_memory_MiB=round(memory_bytes(state) / 2**20, 1),
               rss_before_load_MiB=round(rss_before, 1), rss_after_load_MiB=round(rss_loaded, 1),
               rss_after_prefill_MiB=round(rss_prefill, 1),
               peak_rss_MiB=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               prefill_s=round(prefill, 3), prefill_attend_s=round(marks[0], 3),
               prefill_hook_allreduce_s=round(marks[1], 3), prefill_hook_calls=marks[4],
               prefill_score_allreduce_s=round(marks[2], 4), prefill_score_calls=marks[5],
               decode_ms_per_token=round(1000 * decode / a.decode, 2),
               decode_attend_ms_per_token=round(1000 * (attend.seconds - marks[0]) / a.decode, 2),
               decode_hook_allreduce_ms_per_token=round(1000 * (hooks.seconds - marks[1]) / a.decode, 2),
               decode_score_allreduce_ms_per_token=round(1000 * (scores.seconds - marks[2]) / a.decode, 3),
               decode_score_calls_per_token=(scores.calls - marks[5]) / a.decode)
    print(json.dumps(out), flush=True)
    if distributed:
        barrier(group)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
