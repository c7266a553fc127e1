"""Named memory configurations: the InfLLM paper's (arXiv 2402.04617, §4.1) and the
reference repository's ``config/*.yaml`` (thunlp/InfLLM), for the models they were made
for, as ``MemoryConfig.preset(name, args)``.

The paper: execution chunk 512, blocks of 128 with 4 representative tokens, local window
4096, 128 initial tokens, 96 retrieved blocks for Mistral-7B and 32 for Llama-3-8B, 32
cached blocks. Here the fast tier must hold one chunk's whole selection (``topk <=
max_cached_blocks``), so a preset that retrieves more blocks than the paper caches gets
as many cache slots as it retrieves (the paper's GPU cache of 32 is a smaller budget than
a 96-block selection; the reference loads the rest per chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelArgs
from .errors import InfLLMLiteError


@dataclass(frozen=True)
class MemoryPreset:
    """A named set of MemoryConfig fields, the models it was made for, and where it is from."""

    fields: dict
    models: str  # the checkpoints it was written for
    source: str
    rope_theta: float | None = None  # the RoPE base of those checkpoints (the yaml's ``base``)
    notes: str = ""


_PAPER = dict(n_init=128, n_local=4096, block_size=128, repr_topk=4, exc_block_size=512)
_REPO = dict(n_init=128, n_local=4096, block_size=128, repr_topk=4, exc_block_size=512, topk=16,
             max_cached_blocks=32)

PRESETS: dict[str, MemoryPreset] = {
    "infllm-mistral-paper": MemoryPreset({**_PAPER, "topk": 96, "max_cached_blocks": 96},
                                         "Mistral-7B-Instruct-v0.2", "paper §4.1", 1e6,
                                         "96 retrieved blocks; 96 cache slots (the paper's 32 cannot hold them here)"),
    "infllm-llama3-paper": MemoryPreset({**_PAPER, "topk": 32, "max_cached_blocks": 32},
                                        "Llama-3-8B-Instruct", "paper §4.1", 5e5),
    "infllm-mistral-repo": MemoryPreset(dict(_REPO), "Mistral-7B-Instruct-v0.2",
                                        "config/mistral-inf-llm.yaml", 1e6),
    "infllm-mistral-12k-repo": MemoryPreset({**_REPO, "topk": 64, "max_cached_blocks": 64, "score_decay": 0.1},
                                            "Mistral-7B-Instruct-v0.2", "config/mistral-inf-llm-12k.yaml", 1e6,
                                            "64 retrieved blocks; 64 cache slots (the yaml's 32 cannot hold them here)"),
    "infllm-llama3-repo": MemoryPreset(dict(_REPO), "Meta-Llama-3-8B-Instruct", "config/llama-3-inf-llm.yaml", 5e5),
    "infllm-qwen-repo": MemoryPreset({**_REPO, "chunk_size": 2048}, "Qwen1.5-7B-Chat", "config/qwen-inf-llm.yaml", 1e6),
    "infllm-vicuna-repo": MemoryPreset({**_REPO, "n_local": 2048, "score_decay": 0.1}, "vicuna-7b-v1.5",
                                       "config/vicuna-inf-llm.yaml", 1e4),
    "infllm-minicpm-repo": MemoryPreset({**_REPO, "n_local": 2048}, "MiniCPM-2B-sft-bf16",
                                        "config/minicpm-inf-llm.yaml", 1e4),
    "streaming-mistral-repo": MemoryPreset(dict(n_init=128, n_local=6144), "Mistral-7B-Instruct-v0.2",
                                           "config/mistral-stream-llm.yaml", 1e6),
    "lm-infinite-mistral-repo": MemoryPreset(dict(n_init=128, n_local=6144), "Mistral-7B-Instruct-v0.2",
                                             "config/mistral-infinite-lm.yaml", 1e6),
}


def preset_fields(name: str, args: ModelArgs | None = None) -> dict:
    """The MemoryConfig fields of preset ``name``, checked against the model ``args`` it
    is applied to (if given): its local window must fit the model's native context, and a
    model with another RoPE base than the preset's checkpoints is refused (the window and
    block sizes were tuned for those)."""
    if name not in PRESETS:
        raise InfLLMLiteError(f"unknown memory preset {name!r}; available: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if args is not None:
        native = args.max_position_embeddings
        if preset.fields.get("n_local", 0) > native:
            raise InfLLMLiteError(f"memory preset {name!r} has a local window of {preset.fields['n_local']} tokens, "
                                  f"beyond this model's native context of {native}: it was made for {preset.models}")
        if preset.rope_theta is not None and args.rope_theta != preset.rope_theta:
            raise InfLLMLiteError(f"memory preset {name!r} was made for {preset.models} (RoPE base "
                                  f"{preset.rope_theta:g}); this model's base is {args.rope_theta:g}")
    return dict(preset.fields)
