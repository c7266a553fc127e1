"""infllm_lite: long-context inference with InfLLM context memory, in plain PyTorch.

    from infllm_lite import load_model, generate
    model, tokenizer = load_model()          # the embedded SmolLM2-135M-Instruct
    print(generate(model, tokenizer, [{"role": "user", "content": "Hi!"}]))
"""

from .chat import ChatSession
from .config import ModelArgs
from .errors import InfLLMLiteError
from .generate import generate, generate_ids
from .loading import load_model
from .memory_config import MemoryConfig, memory_estimate
from .models.transformer import Transformer
from .stats import GenerationStats
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = ["ChatSession", "GenerationStats", "InfLLMLiteError", "MemoryConfig", "ModelArgs", "memory_estimate", "Tokenizer", "Transformer", "generate", "generate_ids",
           "load_model", "__version__"]
