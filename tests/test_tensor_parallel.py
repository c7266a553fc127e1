"""Tensor parallelism over 2 processes on gloo (infllm_lite.parallel).

The module spawns its 2 ranks once (this file run as a script, a localhost rendezvous on a
free port, bounded by a timeout, killed if late); each rank loads its shard of small random
Llama (GQA, every bias) and Qwen2 checkpoints and runs every check, writing what it saw
to a file; the tests compare that with the same checks in this (single) process: logits
within 1e-5, the same greedy tokens for full and infllm attention, the same blocks
selected by every layer at every chunk on both ranks and here; a snapshot refused at
another world size; the embedded model (9 heads, 3 KV heads) refused over 2 ranks (and
equal to one process over 3, under torchrun); and a
rank that dies, or hangs past the collective timeout, makes the other exit with an
error instead of hanging.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from infllm_lite.config import ModelArgs
from infllm_lite.errors import InfLLMLiteError
from infllm_lite.memory_config import MemoryConfig
from torchrun_ranks import kill_with_ranks

WORLD = 2
TIMEOUT_S = 150  # the whole spawn, both ranks
VOCAB = 256
CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "qwen2": dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                  max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1e6,
                  tie_word_embeddings=False),
}
# tiny memory: 150 prompt tokens form ~14 blocks, of which topk=2 are selected per chunk
MEMORY = MemoryConfig(n_init=4, n_local=32, block_size=8, topk=2, repr_topk=2, exc_block_size=16,
                      max_cached_blocks=4, chunk_size=64)
PROMPT_LEN, NEW_TOKENS, DECODE_STEPS = 150, 6, 4


def write_folder(folder: Path, config: dict, seed: int) -> Path:
    """A random checkpoint (HF names) and its config.json."""
    from safetensors.torch import save_file

    from infllm_lite.models.transformer import Transformer
    folder.mkdir(parents=True, exist_ok=True)
    args = ModelArgs.from_hf_config(config)
    with torch.device("meta"):
        shapes = Transformer(args)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, p in shapes.named_parameters():  # a tied head appears once, as the embedding
        t = torch.randn(p.shape, generator=g) * 0.2
        if name.endswith("norm.weight"):
            t += 1.0
        tensors[name if name == "lm_head.weight" else "model." + name] = t
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def run_checks(model) -> dict:
    """What both the ranks and the single process compute with ``model``."""
    from infllm_lite.attention import make_attention_state
    from infllm_lite.generate import generate_ids
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 40), generator=g)
    prompt = torch.randint(0, VOCAB, (PROMPT_LEN,), generator=g).tolist()
    out = {}
    with torch.inference_mode():
        out["logits"] = model(ids)
    out["full"] = list(generate_ids(model, prompt, max_new_tokens=NEW_TOKENS))
    out["infllm"] = list(generate_ids(model, prompt, max_new_tokens=NEW_TOKENS, attention="infllm",
                                      memory=MEMORY, attention_kernel="window-eager"))
    state = make_attention_state("infllm", model.args, capacity=0, memory=MEMORY, kernel="window-eager")
    state.record = True
    tokens = list(prompt)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), state)
        for _ in range(DECODE_STEPS):  # one-query steps: the decode step's selection
            tokens.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[tokens[-1]]]), state)
    out["state_logits"] = logits
    out["trace"] = [[(s, e, sel.tolist()) for s, e, sel in layer.trace] for layer in state.layers]
    out["_state"], out["_tokens"] = state, tokens
    return out


def chat_checks(group) -> dict:
    """A tensor-parallel chat's ranks (:class:`~infllm_lite.parallel.chat.ChatPeers`): the
    end of rank 0's input ends every rank; an error while rank 0 reads reaches the others;
    each step's outcome is agreed (the session is never touched: no line gets that far)."""
    import io

    from infllm_lite.chat_cli import run_chat
    from infllm_lite.parallel.chat import ChatPeers
    import torch.distributed as dist
    rank = dist.get_rank(group)
    peers = ChatPeers(group, wait_s=30)
    found = {"eof": run_chat(None, stdin=io.StringIO("" if rank == 0 else "not read\n"), out=io.StringIO(),
                             peers=peers)}

    class Gone(io.StringIO):
        def readline(self):
            raise OSError("stdin is gone")

    start = time.perf_counter()
    try:
        run_chat(None, stdin=Gone() if rank == 0 else io.StringIO(), out=io.StringIO(), peers=peers)
        found["read_error"] = None
    except (OSError, InfLLMLiteError) as e:
        found["read_error"] = f"{type(e).__name__}: {e}"
    found["read_error_seconds"] = time.perf_counter() - start
    # a command that failed on rank 1 only: every rank shows rank 1's message
    found["command_failed"] = peers.settle(InfLLMLiteError("no such file") if rank == 1 else None)
    found["all_failed"] = peers.settle(InfLLMLiteError("too long"), length=7)  # alike: the chat goes on
    for key, error, length in (("answer_failed", InfLLMLiteError("disk full") if rank == 1 else None, 7),
                               ("lengths_differ", None, 7 + rank)):
        try:
            found[key] = ("went on", peers.settle(error, length=length))
        except InfLLMLiteError as e:
            found[key] = ("ended", str(e))
    return found


# ---------------------------------------------------------------------------- the ranks
def worker(out_dir: Path, folders: list[Path]) -> None:
    from infllm_lite.parallel import build_tp_model, init_distributed, load_tp_model, rank_path
    from infllm_lite.parallel.group import all_reduce_sum
    from infllm_lite.parallel.sharded_load import read_hf_shard
    from infllm_lite.snapshot import load_snapshot, save_snapshot
    import torch.distributed as dist
    torch.set_num_threads(1)
    group = init_distributed("cpu")
    rank = dist.get_rank()
    results = {"backend": str(dist.get_backend())}
    for folder in folders:
        args = ModelArgs.from_hf_config(json.loads((folder / "config.json").read_text()))
        shard = read_hf_shard(folder, args, rank, WORLD)
        results[f"{folder.name}.shard_numel"] = sum(t.numel() for t in shard.values())
        model = build_tp_model(args, shard, group)
        out = run_checks(model)
        state, tokens = out.pop("_state"), out.pop("_tokens")
        snap = save_snapshot(rank_path(out_dir / f"{folder.name}.snap", model), state, model=model,
                             mode="infllm", memory=MEMORY, tokens=tokens)
        again = load_snapshot(snap, model, kernel="window-eager").state  # the same rank, the same world
        all_reduce_sum(torch.zeros(1), group)  # both have saved
        try:  # the other rank's file
            load_snapshot(out_dir / f"{folder.name}.rank{1 - rank}-of-2.snap", model)
            results[f"{folder.name}.other_rank_error"] = None
        except InfLLMLiteError as e:
            results[f"{folder.name}.other_rank_error"] = str(e)
        with torch.inference_mode():
            out["restored_logits"] = model(torch.tensor([[tokens[-1]]]), again)
        results.update({f"{folder.name}.{k}": v for k, v in out.items()})
    results["chat"] = chat_checks(group)
    try:  # the embedded model: 9 heads, 3 KV heads, not divisible by 2
        load_tp_model(None, group=group, progress=False)
        results["embedded_error"] = None
    except InfLLMLiteError as e:
        results["embedded_error"] = str(e)
    from datetime import timedelta
    short = dist.new_group(timeout=timedelta(seconds=2))  # a peer that hangs: rank 1 never joins
    start = time.perf_counter()
    if rank == 0:
        try:
            all_reduce_sum(torch.zeros(1), short)
            results["hung_error"] = None
        except InfLLMLiteError as e:
            results["hung_error"] = str(e)
        results["hung_seconds"] = time.perf_counter() - start
    torch.save(results, out_dir / f"rank{rank}.pt")
    all_reduce_sum(torch.zeros(1), group)  # both ranks have written
    if rank == 1:
        os._exit(0)  # dies without a word: rank 0's next collective must fail, not hang
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 4, dtype=torch.long))
        dead = None
    except InfLLMLiteError as e:
        dead = str(e)
    (out_dir / "dead_rank.json").write_text(json.dumps({"error": dead, "seconds": time.perf_counter() - start}))
    os._exit(0)  # the group cannot be destroyed cleanly without its peer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    folders = [write_folder(root / name, config, seed) for seed, (name, config) in enumerate(CONFIGS.items())]
    out_dir = root / "out"
    out_dir.mkdir()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(WORLD),
               INFLLM_LITE_DIST_TIMEOUT="60", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(out_dir), *map(str, folders)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    reference = {}  # the single process, meanwhile
    from infllm_lite.models.build import build_model
    from infllm_lite.weights.hf_folder import read_hf_config, read_hf_state_dict
    for folder in folders:
        model = build_model(ModelArgs.from_hf_config(read_hf_config(folder)), read_hf_state_dict(folder))
        out = run_checks(model)
        state, tokens = out.pop("_state"), out.pop("_tokens")
        with torch.inference_mode():  # what the ranks' restored memories compute, here unsaved
            out["restored_logits"] = model(torch.tensor([[tokens[-1]]]), state)
        reference[folder.name] = out
        reference[f"{folder.name}.model"] = model
    deadline = time.monotonic() + TIMEOUT_S
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the ranks did not finish within {TIMEOUT_S} s:\n" + "\n".join(
            (p.communicate()[0] or "")[-3000:] for p in procs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert (out_dir / f"rank{r}.pt").exists(), f"rank {r} failed (exit {p.returncode}):\n{log[-4000:]}"
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return dict(ranks=ranks, reference=reference, out_dir=out_dir, logs=logs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tensor_parallel_logits_equal_single_process(spawned, name):
    ref = spawned["reference"][name]
    for r, rank in enumerate(spawned["ranks"]):
        assert rank["backend"] == "gloo"
        for key in ("logits", "state_logits", "restored_logits"):  # the last after a snapshot's round trip
            torch.testing.assert_close(rank[f"{name}.{key}"], ref[key], atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"rank {r} {key}: {m}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generation_and_selected_blocks_equal(spawned, name):
    ref = spawned["reference"][name]
    traces = [rank[f"{name}.trace"] for rank in spawned["ranks"]]
    n_chosen = sum(1 for layer in ref["trace"] for _, _, sel in layer for row in sel if min(row) >= 0)
    assert n_chosen > 10  # blocks were selected: beyond the local window, more than topk formed
    assert all(len(layer) > 10 for layer in ref["trace"])
    for r, rank in enumerate(spawned["ranks"]):
        assert rank[f"{name}.full"] == ref["full"], f"rank {r}"
        assert rank[f"{name}.infllm"] == ref["infllm"], f"rank {r}"
        assert traces[r] == ref["trace"], f"rank {r} selected other blocks than the single process"


def test_each_rank_holds_its_shard_only(spawned):
    """The split tensors are read as slices: a rank's shard is its share plus the replicated
    embedding, norms and head."""
    for name, config in CONFIGS.items():
        whole = sum(t.numel() for t in spawned["reference"][f"{name}.model"].state_dict().values()
                    ) - (0 if not config["tie_word_embeddings"] else config["vocab_size"] * config["hidden_size"])
        replicated = config["vocab_size"] * config["hidden_size"] * (1 if config["tie_word_embeddings"] else 2)
        replicated += config["hidden_size"] * (2 * config["num_hidden_layers"] + 1)  # norms
        if config.get("attention_bias"):
            replicated += config["hidden_size"] * config["num_hidden_layers"]  # o_proj bias (zeros off rank 0)
        if config.get("mlp_bias"):
            replicated += config["hidden_size"] * config["num_hidden_layers"]  # down_proj bias
        for rank in spawned["ranks"]:
            assert rank[f"{name}.shard_numel"] == replicated + (whole - replicated) // WORLD


def test_snapshot_refused_at_another_world_size_or_rank(spawned):
    from infllm_lite.snapshot import load_snapshot
    for r, rank in enumerate(spawned["ranks"]):
        assert f"holds rank {1 - r}'s heads; this is rank {r}" in rank["llama.other_rank_error"]
    model = spawned["reference"]["llama.model"]
    with pytest.raises(InfLLMLiteError, match="tensor-parallel world of 2 .*world of 1"):
        load_snapshot(spawned["out_dir"] / "llama.rank0-of-2.snap", model)


def test_bad_world_size_is_refused(spawned):
    message = spawned["ranks"][0]["embedded_error"]
    assert message is not None and "attention heads (9) to be divisible by 2" in message, message
    assert spawned["ranks"][1]["embedded_error"] == message
    from infllm_lite.parallel import local_args
    args = ModelArgs.from_hf_config(CONFIGS["qwen2"])
    with pytest.raises(InfLLMLiteError, match=r"attention heads \(8\) to be divisible by 3"):
        local_args(args, 0, 3)
    with pytest.raises(InfLLMLiteError, match=r"key/value heads \(2\) to be divisible by 4"):
        local_args(args, 0, 4)  # 8 heads split, but not 2 KV heads


def test_a_hung_rank_times_out_with_an_error(spawned):
    message, seconds = spawned["ranks"][0]["hung_error"], spawned["ranks"][0]["hung_seconds"]
    assert message is not None and "rank 0: an all_reduce failed" in message, message
    assert 1.5 < seconds < 30, seconds


def test_a_dead_rank_stops_the_others_with_an_error(spawned):
    found = json.loads((spawned["out_dir"] / "dead_rank.json").read_text())
    assert found["error"] is not None and "rank 0: an all_reduce failed: another rank died" in found["error"]
    assert found["seconds"] < 60


def test_chat_ranks_end_together_and_agree_on_each_step(spawned):
    """The end of rank 0's input ends every rank (exit 0); an error while rank 0 reads
    ends the others at once with an error; a step failed on some rank is shown by every
    rank, and an answer that failed on some ranks only ends the chat on all."""
    ranks = [rank["chat"] for rank in spawned["ranks"]]
    assert [r["eof"] for r in ranks] == [0, 0]
    assert ranks[0]["read_error"] == "OSError: stdin is gone"
    assert ranks[1]["read_error"] == "InfLLMLiteError: rank 0 ended the chat (OSError: stdin is gone)"
    assert ranks[1]["read_error_seconds"] < 10
    for r in ranks:
        assert r["command_failed"] == "rank 1: no such file"
        assert r["all_failed"] == "too long"
        assert r["answer_failed"][0] == "ended" and r["answer_failed"][1].startswith("rank 1: disk full; ")
        assert r["lengths_differ"][0] == "ended" and "[7, 8]" in r["lengths_differ"][1]


class OtherRankFailsLoad:
    """The peers of a chat in which another rank fails every /load (its file missing)."""

    interruptible = True

    def share_line(self, read):
        self.line = read()
        return self.line

    def settle(self, error, *, length=None):
        if error is None and (self.line or "").startswith("/load"):
            return "rank 1: snapshot chat.rank1-of-2.snap does not exist"
        return None if error is None else str(error)


def test_chat_load_failed_on_another_rank_is_undone(tiny, tmp_path):
    import io

    from infllm_lite.chat import ChatSession
    from infllm_lite.chat_cli import run_chat
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer, attention="infllm", memory=EMBEDDED_MEMORY, max_new_tokens=4,
                          kernel="window-eager")
    script = f"Hello\n/save {tmp_path / 'chat.snap'}\n/reset\n/load {tmp_path / 'chat.snap'}\n/stats\n"
    out = io.StringIO()
    assert run_chat(session, stdin=io.StringIO(script), out=out, peers=OtherRankFailsLoad()) == 0
    text = out.getvalue()
    assert "error: rank 1: snapshot chat.rank1-of-2.snap does not exist" in text
    assert "loaded" not in text and "tokens: 0  messages: 0" in text  # still the reset conversation


def test_chat_help_under_tensor_parallel_says_ctrl_c_ends_the_chat(tiny):
    import io

    from infllm_lite.chat import ChatSession
    from infllm_lite.chat_cli import Alone, run_chat
    class Ranks(Alone):  # as ChatPeers: Ctrl-C is torchrun's, it ends every rank
        interruptible = False

    model, tokenizer = tiny
    texts = {}
    for peers in (Alone(), Ranks()):
        session = ChatSession(model, tokenizer, attention="full", max_new_tokens=1)
        out = io.StringIO()
        assert run_chat(session, stdin=io.StringIO("/help\n"), out=out, peers=peers) == 0
        texts[peers.interruptible] = out.getvalue()
    assert "Ctrl-C stops an answer" in texts[True] and "Ctrl-C ends the chat" not in texts[True]
    assert "Ctrl-C ends the chat" in texts[False] and "Ctrl-C stops an answer" not in texts[False]


class FakeShard:
    """A data-parallel rank run in this process: the ranks run one after another, so the
    barriers have nothing to wait for."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.file_name = f"predictions.rank{rank}-of-{world_size}.jsonl"

    def barrier(self):
        pass

    def wait_for_all(self):
        pass


def test_data_parallel_merge_and_resume_at_another_world_size(tiny, tmp_path):
    """The merge's order is one process's, whatever world size wrote the rank files, and a
    run resumed at another world size answers only what is missing."""
    from infllm_lite.eval.runner import PREDICTIONS, EvalPlan, run_eval
    model, tokenizer = tiny
    plan = dict(tasks=["passkey", "kv_retrieval"], modes=["infllm", "full"], lengths=[300], samples=3,
                memory=EMBEDDED_MEMORY, attention_kernel="window-eager")
    run_eval(model, tokenizer, EvalPlan(**plan), tmp_path / "one", progress=False, plots=False)
    two = tmp_path / "two"
    two.mkdir()  # rank 0 makes it before the others start
    # an interrupted 3-rank run: only rank 2 finished its samples (units 2 and 5)
    assert run_eval(model, tokenizer, EvalPlan(**plan), two, progress=False, plots=False,
                    shard=FakeShard(2, 3)) is None
    assert len((two / "predictions.rank2-of-3.jsonl").read_text().splitlines()) == 2 * 2
    for rank in (1, 0):  # resumed over 2 ranks; rank 0 last: it merges
        run_eval(model, tokenizer, EvalPlan(**plan), two, progress=False, plots=False, shard=FakeShard(rank, 2))
    assert not list(two.glob("predictions.rank*"))
    timing = ("prefill_seconds", "prefill_tokens_per_s", "decode_tokens_per_s")
    one, merged = ([{k: v for k, v in json.loads(line).items() if k not in timing}
                    for line in (d / PREDICTIONS).read_text().splitlines()] for d in (tmp_path / "one", two))
    assert merged == one and len(one) == 2 * 3 * 2


EMBEDDED_MEMORY = MemoryConfig(n_init=4, n_local=64, block_size=16, topk=2, exc_block_size=32, max_cached_blocks=4)


def embedded_checks(model) -> dict:
    from infllm_lite.generate import generate_ids
    ids = torch.randint(0, model.args.vocab_size, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model(ids)
    return dict(logits=logits, infllm=list(generate_ids(model, ids[0].tolist(), max_new_tokens=4, attention="infllm",
                                                         memory=EMBEDDED_MEMORY, attention_kernel="window-eager")))


def embedded_worker(out: Path) -> None:
    import torch.distributed as dist

    from infllm_lite.parallel import load_tp_model
    torch.set_num_threads(1)
    model, _ = load_tp_model(None, progress=False)
    found = embedded_checks(model)
    if dist.get_rank() == 0:
        torch.save(found, out)
    dist.destroy_process_group()


def test_embedded_model_over_three_ranks_equals_one_process(smollm, tmp_path):
    """SmolLM2-135M: 9 heads, 3 KV heads, 1536 MLP columns: 3 ranks of 3, 1 and 512."""
    out = tmp_path / "embedded.pt"
    done = torchrun([], nproc=3, script=[__file__, "--embedded-worker", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    model, _ = smollm
    want, got = embedded_checks(model), torch.load(out)
    # 30 layers of float32 sums reassociated by the split: measured at most 5e-5 apart on
    # logits up to 34 (1.5e-6 of their range), over 1e-5 for about 1 logit in 10^4
    torch.testing.assert_close(got["logits"], want["logits"], atol=1e-4, rtol=1e-5)
    assert got["infllm"] == want["infllm"]


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]])
if __name__ == "__main__" and sys.argv[1:2] == ["--embedded-worker"]:
    embedded_worker(Path(sys.argv[2]))


# ---------------------------------------------------------------------------- under torchrun
def torchrun(args: list[str], timeout: float = 120, nproc: int = WORLD, script: list[str] | None = None,
             cwd: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m infllm_lite ARGS`` (or ``SCRIPT...``) on a free
    localhost port, in ``cwd``, its ranks sharing ``stdin`` (default: none)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           *(script if script is not None else ["-m", "infllm_lite", *args])]
    env = dict(os.environ, OMP_NUM_THREADS="1", INFLLM_LITE_DIST_TIMEOUT="60", INFLLM_LITE_EVAL_WAIT="60")
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd)
    try:
        out, err = proc.communicate(stdin if stdin is not None else "", timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_with_ranks(proc)  # the ranks too: they do not die with torchrun
        err = proc.stderr.read()
        pytest.fail(f"torchrun did not finish within {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


CLI_MEMORY = ["--n-init", "4", "--n-local", "64", "--block-size", "16", "--topk", "2",
              "--attention-kernel", "window-eager"]


def test_torchrun_generate_tensor_parallel_prints_once_what_one_process_prints(tiny_folder, tmp_path, capsys):
    from infllm_lite.cli import main
    prompt = " ".join(f"item {i} is {i * 7 % 13}." for i in range(60))  # ~500 tokens: blocks selected
    args = ["generate", "--model", str(tiny_folder), "--prompt", prompt, "--prompt", "Once upon a time",
            "--max-new-tokens", "8", "--attention", "infllm", *CLI_MEMORY]  # two prompts: the engine
    assert main(args) == 0
    alone = capsys.readouterr().out
    done = torchrun(args + ["--tensor-parallel"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == alone and alone.count("==> prompt") == 2
    assert main(args + ["--tensor-parallel", "--output", str(tmp_path / "x.jsonl")]) == 1  # before any work
    assert "--output does not apply with --tensor-parallel" in capsys.readouterr().err


def test_torchrun_eval_data_parallel_equals_one_process(tiny_folder, tmp_path, capsys):
    from infllm_lite.cli import main
    from infllm_lite.eval.runner import PREDICTIONS
    args = ["eval", "--model", str(tiny_folder), "--task", "passkey,kv_retrieval", "--attention", "infllm,full",
            "--lengths", "400", "--samples", "3", "--no-plots", *CLI_MEMORY]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    done = torchrun(args + ["--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 prints
    # what differs between two runs of the same plan: clocks, the command, and the threads
    # per process (torchrun gives each rank OMP_NUM_THREADS=1)
    timing = ("prefill_seconds", "prefill_tokens_per_s", "decode_tokens_per_s", "date", "command", "threads")

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in timing}
        return [strip(v) for v in x] if isinstance(x, list) else x

    one, two = (strip([json.loads(line) for line in (tmp_path / d / PREDICTIONS).read_text().splitlines()])
                for d in ("one", "two"))
    assert len(one) == 2 * 3 * 2 and two == one  # the same records in the same order
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    summaries = [strip(json.loads((tmp_path / d / "summary.json").read_text())) for d in ("one", "two")]
    assert summaries[0] == summaries[1]


def test_torchrun_chat_tensor_parallel_answers_as_one_process(tiny_folder, tmp_path, monkeypatch, capsys):
    """Two turns over a document (blocks selected), around /save, /reset and /load, with
    seeded sampling: rank 0 prints what one process prints, each rank saved its own
    snapshot, and the closed stdin ended both ranks."""
    import io
    import re

    from infllm_lite.cli import main
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"Room {i} holds {i * 7 % 13} chairs." for i in range(40)))  # ~400 tokens
    args = ["chat", "--model", str(tiny_folder), "--file", str(doc), "--max-new-tokens", "10",
            "--temperature", "0.8", "--top-k", "40", "--seed", "3", *CLI_MEMORY]
    script = "How many chairs are in room 5?\n/save chat.snap\n/reset\n/load chat.snap\nAnd in room 9?\n/stats\n"
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    monkeypatch.chdir(tmp_path / "one")
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main(args) == 0
    alone = capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    done = torchrun(args + ["--tensor-parallel"], cwd=tmp_path / "two", stdin=script)
    assert done.returncode == 0, done.stderr[-3000:]
    assert alone.count("assistant> ") == 2 and "loaded " in alone
    saved = re.search(r"saved \d+ tokens and 3 messages to chat.snap\n", alone).group(0)
    want = alone.replace(saved, saved.replace("chat.snap", "chat.rank*-of-2.snap (one file per rank)"))
    # /stats: the same tokens and blocks; the bytes are rank 0's share
    stats = re.compile(r"(blocks: [1-9]\d*  .*)bytes: [0-9.]+ MiB(  ranks: 2 \(bytes: rank 0's\))?")
    assert stats.search(alone) and stats.search(done.stdout).group(2)
    assert stats.sub(r"\1", done.stdout) == stats.sub(r"\1", want)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["chat.rank0-of-2.snap", "chat.rank1-of-2.snap"]
