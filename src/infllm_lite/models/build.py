"""Build a :class:`Transformer` from a config and a Hugging Face state dict, checking
that every tensor is present, expected and of the right shape."""

from __future__ import annotations

import torch

from ..config import ModelArgs
from ..errors import InfLLMLiteError
from .transformer import Transformer

#: Checkpoint tensors that carry no weights of ours (buffers some exporters save).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _our_name(hf_name: str) -> str:
    return hf_name[len("model."):] if hf_name.startswith("model.") else hf_name


def build_model(args: ModelArgs, state_dict: dict[str, torch.Tensor], *,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Transformer:
    """Create the model on ``device`` in ``dtype`` and load ``state_dict`` (HF names) into it."""
    with torch.device("meta"):
        model = Transformer(args).to(dtype)  # no memory yet: allocated once, in dtype, below
    expected = {name: p for name, p in model.named_parameters()}  # tied lm_head appears once
    given = {_our_name(n): t for n, t in state_dict.items() if not n.endswith(_IGNORED_SUFFIXES)}
    if args.tie_word_embeddings:
        given.pop("lm_head.weight", None)  # tied: the embedding is the head
    for name, tensor in given.items():
        if name not in expected:
            raise InfLLMLiteError(f"weights do not match the config: unexpected tensor {name!r}")
    for name, param in expected.items():  # in model order: the first mismatch is the one named
        if name not in given:
            missing = [n for n in expected if n not in given]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise InfLLMLiteError(f"weights do not match the config: missing tensor {name!r}{more}")
        if tuple(given[name].shape) != tuple(param.shape):
            raise InfLLMLiteError(
                f"weights do not match the config: tensor {name!r} has shape {tuple(given[name].shape)}, "
                f"the config implies {tuple(param.shape)}")
    # The checkpoint's tensors become the parameters (cast or moved only when they differ
    # from dtype/device): no second copy of the weights, so peak memory is one model.
    weights = {name: given[name].to(device=device, dtype=dtype) for name in expected}
    model.load_state_dict(weights, strict=False, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary_emb = type(model.rotary_emb)(args).to(device)  # float32 buffer, rebuilt off meta
    still_meta = [name for name, t in model.state_dict().items() if t.is_meta]
    if still_meta:
        raise InfLLMLiteError(f"internal: tensors left unloaded: {still_meta[:4]}")
    return model.eval()
