"""Memory snapshots: a generation's complete attention memory and token history in one
safetensors file, loaded back into a fresh process to continue exactly where it stopped.

The file's metadata holds a JSON header: the format and its version, the attention mode,
the ``MemoryConfig``, the model's identity (its config and a fingerprint of its weights),
the memory's host-side values, a CRC-32 of every tensor, and what the caller adds
(``extra``: a chat's messages, say). Loading refuses, with a clear error, a file that is
not a snapshot, a truncated or corrupt one, a newer format, another model, or a memory
config that would change what the memory holds (placement options, ``max_host_bytes`` and
``offload_dir``, and ``chunk_size`` may differ). Under tensor parallelism each rank saves
its own file (its heads' memory); a file is refused by another rank or world size.

    save_snapshot("doc.snap", state, model=model, mode="infllm", memory=memory, tokens=ids)
    snap = load_snapshot("doc.snap", model)      # snap.state continues the generation
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .attention import AttentionState, make_attention_state
from .errors import InfLLMLiteError
from .memory_config import MemoryConfig

FORMAT = "infllm-lite-snapshot"
VERSION = 2  # 2: an InfLLM memory holds only the slots and blocks in use
# MemoryConfig fields that only say where the memory lives or how a prompt is cut into calls
PLACEMENT = ("max_host_bytes", "offload_dir", "chunk_size")


@dataclass
class Snapshot:
    """A loaded snapshot: the restored memory and what was saved with it."""

    state: AttentionState
    mode: str
    memory: MemoryConfig | None
    tokens: list[int]  # every token the memory has read, in order
    extra: dict = field(default_factory=dict)


def model_identity(model) -> dict:
    """The model's config, a fingerprint of its weights (SHA-256 of the embedding's first
    rows and the final norm, in float32): enough to tell checkpoints apart, and its weights'
    quantization (``model.quantization``: ``int8``, ``int4/g32``, ``gguf``; absent for
    float weights, as in snapshots written before quantization existed)."""
    args = json.loads(json.dumps(asdict(model.args), default=str))
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        if name.endswith("embed_tokens.weight") or name == "norm.weight":
            digest.update(state[name][:64].detach().float().cpu().contiguous().numpy().tobytes())
    identity = {"args": args, "weights_sha256": digest.hexdigest()}
    if getattr(model, "quantization", None) is not None:
        identity["quantization"] = model.quantization
    return identity


def _crc(x: torch.Tensor) -> int:
    return zlib.crc32(x.contiguous().view(torch.uint8).reshape(-1).numpy())


def save_snapshot(path: str | Path, state: AttentionState, *, model, mode: str,
                  memory: MemoryConfig | None, tokens: list[int], extra: dict | None = None) -> Path:
    """Write ``state`` (the memory of ``mode``, configured by ``memory``) and the ``tokens``
    it has read to ``path`` (written to a temporary name first: a crash leaves no half file)."""
    from safetensors.torch import save_file

    if len(tokens) != state.length:
        raise InfLLMLiteError(f"the token history has {len(tokens)} tokens but the memory has read "
                              f"{state.length}")
    tensors, meta = state.export()
    # safetensors wants separate contiguous CPU tensors (the exported ones may be views)
    tensors = {name: x.detach().to("cpu").contiguous().clone() for name, x in tensors.items()}
    tensors["tokens"] = torch.tensor(tokens, dtype=torch.long)
    header = dict(format=FORMAT, version=VERSION, mode=mode,
                  memory=None if memory is None else memory.to_dict(), model=model_identity(model),
                  dtype=str(next(model.parameters()).dtype), state=meta, extra=extra or {},
                  crc32={name: _crc(x) for name, x in tensors.items()})
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"infllm_lite": json.dumps(header)})
    tmp.replace(path)
    return path


def read_header(path: str | Path) -> dict:
    """The snapshot's JSON header (no tensors read). Raises InfLLMLiteError on a file that is
    not a snapshot."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InfLLMLiteError(f"snapshot {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own errors on damaged headers
        raise InfLLMLiteError(f"{path} is not a readable snapshot (damaged or not safetensors: {e})") from None
    try:
        header = json.loads(metadata["infllm_lite"])
    except (KeyError, json.JSONDecodeError):
        raise InfLLMLiteError(f"{path} is a safetensors file but not an infllm-lite snapshot") from None
    if header.get("format") != FORMAT:
        raise InfLLMLiteError(f"{path} is not an infllm-lite snapshot")
    if header.get("version") != VERSION:
        raise InfLLMLiteError(f"{path} has snapshot format version {header.get('version')}; this "
                              f"infllm-lite reads version {VERSION}")
    return header


def _check_model(path: Path, header: dict, model) -> None:
    saved, now = header["model"], model_identity(model)
    if saved == now:
        return
    if saved["args"] == now["args"] and saved.get("quantization") != now.get("quantization"):
        def weights(q):
            return "float weights" if q is None else f"{q} weights"
        raise InfLLMLiteError(f"{path} was saved from this checkpoint with {weights(saved.get('quantization'))}; "
                              f"this model has {weights(now.get('quantization'))}: load the model as it was "
                              "saved (--quantize)")
    # tensor parallelism (infllm_lite.parallel): a rank's snapshot holds its heads only
    was = (saved["args"].get("tp_rank", 0), saved["args"].get("tp_world_size", 1))
    is_ = (now["args"].get("tp_rank", 0), now["args"].get("tp_world_size", 1))
    if was[1] != is_[1]:
        raise InfLLMLiteError(f"{path} was saved by rank {was[0]} of a tensor-parallel world of {was[1]} "
                              f"process(es); this model runs in a world of {is_[1]}: load it with the "
                              "world size that saved it")
    if was[0] != is_[0]:
        raise InfLLMLiteError(f"{path} holds rank {was[0]}'s heads; this is rank {is_[0]}: each rank "
                              "loads the snapshot it saved")
    differ = [k for k in sorted(set(saved["args"]) | set(now["args"]))
              if saved["args"].get(k) != now["args"].get(k)]
    what = (f"its config differs in {', '.join(differ[:6])}" if differ
            else "same config, other weights")
    raise InfLLMLiteError(f"{path} was saved from another model ({what}); load it with the model "
                          "that made it")


def _check_memory(path: Path, saved: MemoryConfig | None, given: MemoryConfig | None) -> MemoryConfig | None:
    """The config to restore with: the saved one, with the caller's placement options."""
    if given is None or saved is None:
        return saved
    differ = [k for k in asdict(saved) if k not in PLACEMENT and getattr(saved, k) != getattr(given, k)]
    if differ:
        raise InfLLMLiteError(
            f"{path} holds a memory with another config ({', '.join(f'{k}={getattr(saved, k)!r}' for k in differ)} "
            f"there, {', '.join(f'{k}={getattr(given, k)!r}' for k in differ)} given)")
    return replace(saved, **{k: getattr(given, k) for k in PLACEMENT})


def load_snapshot(path: str | Path, model, *, memory: MemoryConfig | None = None,
                  capacity: int | None = None, kernel: str = "auto") -> Snapshot:
    """Restore the memory saved at ``path`` for ``model`` (the one that made it). ``memory``:
    the config you expect (refused if it would change the memory; its placement options
    apply); ``capacity``: for full attention, tokens the restored cache holds (default:
    what it held plus 4096); ``kernel``: how infllm computes attention."""
    from safetensors import safe_open

    path = Path(path)
    header = read_header(path)
    _check_model(path, header, model)
    saved = None if header["memory"] is None else MemoryConfig(**header["memory"])
    config = _check_memory(path, saved, memory)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:
        raise InfLLMLiteError(f"{path} is damaged (reading its tensors failed: {e})") from None
    expected = header["crc32"]
    if set(tensors) != set(expected) or any(_crc(tensors[n]) != expected[n] for n in expected):
        raise InfLLMLiteError(f"{path} is corrupt (its tensors do not match their checksums)")
    tokens = tensors.pop("tokens").tolist()
    param = next(model.parameters())
    if header["dtype"] != str(param.dtype):
        raise InfLLMLiteError(f"{path} was saved with the model in {header['dtype']}; it is in "
                              f"{param.dtype} now")
    length = header["state"]["length"]
    state = make_attention_state(header["mode"], model.args,
                                 capacity=capacity if capacity is not None else length + 4096,
                                 memory=config, dtype=param.dtype, device=param.device, kernel=kernel)
    state.restore({k: v.to(param.device) for k, v in tensors.items()}, header["state"])
    return Snapshot(state=state, mode=header["mode"], memory=config, tokens=tokens, extra=header["extra"])
