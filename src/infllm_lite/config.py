"""Model hyper-parameters, read from a Hugging Face ``config.json`` (or GGUF metadata
converted to one by :mod:`infllm_lite.weights.gguf`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import InfLLMLiteError

#: config.json ``model_type`` -> the architecture family our Transformer implements.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelArgs:
    """Everything the Transformer needs to know about a checkpoint."""

    model_type: str = "llama"
    vocab_size: int = 32000
    dim: int = 4096  # hidden size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3", "factor": ..., ...}
    max_position_embeddings: int = 4096  # the model's native (pre-training) window
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2; Llama's attention_bias
    o_bias: bool = False  # Llama's attention_bias
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral v0.1 style local attention in full mode
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "intermediate_size"):
            if int(getattr(self, name)) <= 0:
                raise InfLLMLiteError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise InfLLMLiteError(
                f"model config: num_attention_heads ({self.n_heads}) is not a multiple of "
                f"num_key_value_heads ({self.n_kv_heads})")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in SUPPORTED_ROPE_TYPES:
                raise InfLLMLiteError(
                    f"model config: rope_scaling type {kind!r} is not supported "
                    f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "ModelArgs":
        """Build from the dict of an HF ``config.json`` (transformers 4.x and 5.x spellings)."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = ", ".join(config.get("architectures") or []) or "unknown architecture"
            raise InfLLMLiteError(
                f"unsupported architecture: model_type {model_type!r} ({archs}); "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        try:
            dim = int(config["hidden_size"])
            n_heads = int(config["num_attention_heads"])
            rope = dict(config.get("rope_parameters") or {})  # transformers 5 spelling
            scaling = config.get("rope_scaling") or None
            if scaling is None and rope.get("rope_type", "default") != "default":
                scaling = rope
            if scaling is not None:
                scaling = dict(scaling)
                scaling.setdefault("rope_type", scaling.get("type", "default"))
                if scaling["rope_type"] == "default":
                    scaling = None
            theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
            eos = config.get("eos_token_id")
            eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
            sliding = config.get("sliding_window")
            if model_type == "qwen2" and not config.get("use_sliding_window", False):
                sliding = None
            attention_bias = bool(config.get("attention_bias", False))
            return cls(
                model_type=model_type,
                vocab_size=int(config["vocab_size"]),
                dim=dim,
                n_layers=int(config["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
                head_dim=int(config.get("head_dim") or dim // n_heads),
                intermediate_size=int(config["intermediate_size"]),
                norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=scaling,
                max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=model_type == "qwen2" or attention_bias,
                o_bias=model_type != "qwen2" and attention_bias,
                mlp_bias=bool(config.get("mlp_bias", False)),
                sliding_window=int(sliding) if sliding else None,
                bos_token_id=config.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except KeyError as e:
            raise InfLLMLiteError(f"model config: missing required field {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            raise InfLLMLiteError(f"model config: invalid value ({e})") from e
