"""Shared fixtures: the embedded model's folder, its tokenizer, and a tiny random model
with the same tokenizer (fast generation tests)."""

from __future__ import annotations

import os

# CPU machines run the Triton kernels in triton's interpreter. A GPU run sets
# TRITON_INTERPRET=0 explicitly (else compiled code, inductor's Triton kernels included,
# would be interpreted too). Set before any import; infllm_lite.kernels reads it at launch.
os.environ.setdefault("TRITON_INTERPRET", "1")

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from infllm_lite.config import ModelArgs
from infllm_lite.models.transformer import Transformer
from infllm_lite.tokenizer import Tokenizer
from infllm_lite.weights.embedded import embedded_gguf_path, embedded_model_dir
from infllm_lite.models.linear import cpu_linear_kernel

# The CPU product kernel is chosen by a timing probe per process; on a loaded machine two
# processes could choose differently and differ in their last bits. The tests' own child
# processes (a snapshot continued elsewhere, CLI runs, ranks) take this process's choice.
os.environ.setdefault("INFLLM_LITE_CPU_LINEAR", cpu_linear_kernel())

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")

TINY_CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152,
                   hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                   bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return embedded_gguf_path()


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct converted to an HF folder (cached across runs)."""
    return embedded_model_dir(progress=False)


@pytest.fixture(scope="session")
def smollm(smollm_dir):
    from infllm_lite.loading import load_model
    return load_model(None, dtype=torch.float32, device="cpu", progress=False)


@pytest.fixture(scope="session")
def tokenizer(smollm_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm_dir)


def random_state_dict(model: Transformer, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("norm.weight") else 0.0)
            for name, p in model.state_dict().items() if name != "lm_head.weight"}


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, smollm_dir) -> Path:
    """An HF folder: a tiny random Llama (2 layers, dim 64) with SmolLM2's tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    args = ModelArgs.from_hf_config(TINY_CONFIG)
    with torch.device("meta"):
        shapes = Transformer(args)
    tensors = {"model." + k if k != "lm_head.weight" else k: v
               for k, v in random_state_dict(shapes).items()}
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    for name in TOKENIZER_FILES:
        if (smollm_dir / name).exists():
            shutil.copy(smollm_dir / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny(tiny_folder):
    from infllm_lite.loading import load_model
    return load_model(tiny_folder, dtype=torch.float32, device="cpu", progress=False)
