"""Reading checkpoints without ``transformers``: Hugging Face folders (safetensors), hub ids,
GGUF files (converted to HF names and layout), and the embedded default model."""

from .embedded import cache_dir, embedded_gguf_path, embedded_model_dir
from .gguf import GGUFCheckpoint, convert_gguf, read_gguf
from .hf_folder import read_hf_config, read_hf_state_dict
from .hub import resolve_source

__all__ = ["GGUFCheckpoint", "cache_dir", "convert_gguf", "embedded_gguf_path", "embedded_model_dir",
           "read_gguf", "read_hf_config", "read_hf_state_dict", "resolve_source"]
