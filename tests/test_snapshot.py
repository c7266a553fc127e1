"""Memory snapshots on disk: a loaded snapshot continues exactly (in this process and in a
new one); other models, other configs, truncated, corrupt and foreign files are refused."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from infllm_lite.attention import make_attention_state
from infllm_lite.errors import InfLLMLiteError
from infllm_lite.memory_config import MemoryConfig, memory_estimate
from infllm_lite.snapshot import load_snapshot, read_header, save_snapshot

MEMORY = MemoryConfig(n_init=4, n_local=32, block_size=8, topk=2, exc_block_size=16,
                      max_cached_blocks=3, cache_policy="lru-s")
IDS = torch.randint(0, 49152, (1, 260), generator=torch.Generator().manual_seed(3))


def _filled(model, mode="infllm", n=200):
    state = make_attention_state(mode, model.args, capacity=400, memory=MEMORY, kernel="torch")
    with torch.inference_mode():
        model(IDS[:, :n], state)
    return state


def _continue(model, state):
    """Logits of the next 60 tokens, fed in calls of 13 then one by one."""
    with torch.inference_mode():
        outs = [model(IDS[:, a:min(a + 13, 250)], state) for a in range(200, 250, 13)]
        outs += [model(IDS[:, t:t + 1], state) for t in range(250, 260)]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("mode", ["infllm", "streaming", "full"])
def test_round_trip_continues_identically(tiny, tmp_path, mode):
    model, _ = tiny
    state = _filled(model, mode)
    path = save_snapshot(tmp_path / "m.snap", state, model=model, mode=mode,
                         memory=None if mode == "full" else MEMORY,
                         tokens=IDS[0, :200].tolist(), extra={"note": "hello"})
    snap = load_snapshot(path, model, kernel="torch", capacity=400)
    assert snap.mode == mode and snap.tokens == IDS[0, :200].tolist() and snap.extra == {"note": "hello"}
    assert snap.state.length == 200
    torch.testing.assert_close(_continue(model, snap.state), _continue(model, state), rtol=0, atol=0)


@pytest.mark.parametrize("n", [64, 1500])
@pytest.mark.parametrize("mode", ["infllm", "streaming", "full"])
def test_a_snapshot_is_sized_by_what_it_holds(tiny, tmp_path, mode, n):
    """Only the slots and blocks in use are written: within 10% (+ 64 KiB of header) of
    the K/V bytes of the tokens the memory holds, not its static arrays (an InfLLM memory
    of this model preallocates 4 MiB of slots: a 64-token snapshot was that large)."""
    model, _ = tiny
    memory = MemoryConfig.for_model(model.args)  # n_init 128, n_local 256: blocks form by 1500
    state = make_attention_state(mode, model.args, capacity=n, memory=memory, kernel="torch")
    with torch.inference_mode():
        model(IDS.repeat(1, 6)[:, :n], state)
    path = save_snapshot(tmp_path / "m.snap", state, model=model, mode=mode,
                         memory=None if mode == "full" else memory, tokens=[0] * n)
    held = min(n, memory.n_init + memory.n_local - 1) if mode == "streaming" else n
    kv = held * memory_estimate(model.args, memory, n)["kv_bytes_per_token"]
    assert path.stat().st_size <= 1.1 * kv + 64 * 1024, (path.stat().st_size, kv)
    snap = load_snapshot(path, model, kernel="torch", capacity=n + 10)
    assert snap.state.length == n


def test_new_process_continues_identically(tiny, tiny_folder, tmp_path):
    model, _ = tiny
    state = _filled(model)
    save_snapshot(tmp_path / "m.snap", state, model=model, mode="infllm", memory=MEMORY,
                  tokens=IDS[0, :200].tolist())
    expected = _continue(model, state)
    torch.save(IDS, tmp_path / "ids.pt")
    script = f"""
import torch
from infllm_lite.loading import load_model
from infllm_lite.snapshot import load_snapshot
torch.set_num_threads({torch.get_num_threads()})  # as here: the sums' order depends on it
model, _ = load_model({str(tiny_folder)!r}, dtype=torch.float32, device="cpu", progress=False)
ids = torch.load({str(tmp_path / "ids.pt")!r})
snap = load_snapshot({str(tmp_path / "m.snap")!r}, model, kernel="torch")
with torch.inference_mode():
    outs = [model(ids[:, a:min(a + 13, 250)], snap.state) for a in range(200, 250, 13)]
    outs += [model(ids[:, t:t + 1], snap.state) for t in range(250, 260)]
torch.save(torch.cat(outs, dim=1), {str(tmp_path / "out.pt")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=0)


def test_placement_options_may_differ(tiny, tmp_path):
    model, _ = tiny
    state = _filled(model)
    save_snapshot(tmp_path / "m.snap", state, model=model, mode="infllm", memory=MEMORY,
                  tokens=IDS[0, :200].tolist())
    capped = replace(MEMORY, max_host_bytes=30_000, chunk_size=64)
    snap = load_snapshot(tmp_path / "m.snap", model, memory=capped, kernel="torch")
    assert snap.memory == capped and snap.state.stats().blocks_disk > 0
    torch.testing.assert_close(_continue(model, snap.state), _continue(model, state), rtol=0, atol=0)


def test_refusals(tiny, smollm, tmp_path):
    model, _ = tiny
    state = _filled(model)
    path = save_snapshot(tmp_path / "m.snap", state, model=model, mode="infllm", memory=MEMORY,
                         tokens=IDS[0, :200].tolist())
    with pytest.raises(InfLLMLiteError, match="another model"):
        load_snapshot(path, smollm[0])
    with pytest.raises(InfLLMLiteError, match="another config.*n_local=32"):
        load_snapshot(path, model, memory=replace(MEMORY, n_local=48))
    with pytest.raises(InfLLMLiteError, match="token history"):
        save_snapshot(tmp_path / "x.snap", state, model=model, mode="infllm", memory=MEMORY, tokens=[1, 2])
    data = path.read_bytes()
    (tmp_path / "cut.snap").write_bytes(data[:len(data) // 2])
    with pytest.raises(InfLLMLiteError, match="damaged|not a readable"):
        load_snapshot(tmp_path / "cut.snap", model)
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF  # a byte of the last tensor's data
    (tmp_path / "flip.snap").write_bytes(bytes(flipped))
    with pytest.raises(InfLLMLiteError, match="corrupt"):
        load_snapshot(tmp_path / "flip.snap", model)
    (tmp_path / "text.snap").write_text("hello")
    with pytest.raises(InfLLMLiteError, match="not a readable snapshot"):
        load_snapshot(tmp_path / "text.snap", model)
    with pytest.raises(InfLLMLiteError, match="does not exist"):
        load_snapshot(tmp_path / "missing.snap", model)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InfLLMLiteError, match="not an infllm-lite snapshot"):
        load_snapshot(tmp_path / "other.safetensors", model)
    header = read_header(path)
    assert header["mode"] == "infllm" and header["memory"]["n_local"] == 32
    assert json.dumps(header)  # plain JSON
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary name
