"""Llama / Mistral / Qwen2 decoder in plain PyTorch (in the manner of gpt-fast's model.py).

Module names follow Hugging Face checkpoints (minus the leading ``model.``), so a
checkpoint's state dict loads without renaming. The model computes un-rotated q/k/v and
hands them to an attention memory (any object with the interface of
``infllm_lite.attention.base``: a state with ``layers``, ``positions(n)``,
``advance(n)``, and per layer ``attend(q, k, v, positions, cos, sin, rope)``), which
decides positions, memory and visibility. ``models/`` imports nothing of ``attention/``:
the memories are built on top of the model, not inside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..causal import causal_attention
from ..config import ModelArgs
from ..rope import RotaryEmbedding, apply_rope
from .linear import Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # statistics in float32
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.sliding_window
        self.q_proj = Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                rope: RotaryEmbedding, memory=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        if memory is None:  # a stateless call: plain causal attention over this input
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            y = causal_attention(q, k, v, positions, positions, self.window)
        else:
            y = memory.attend(q, k, v, positions, cos, sin, rope)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU MLP."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, positions, cos, sin, rope, memory):
        x = x + self.self_attn(self.input_layernorm(x), positions, cos, sin, rope, memory)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Decoder-only LM. ``model(input_ids)`` gives logits (B, T, vocab) like any causal LM."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary_emb = RotaryEmbedding(args)

    def forward(self, input_ids: torch.Tensor, state=None, *,
                last_only: bool = False) -> torch.Tensor:
        """input_ids: (B, T). With a state (an ``AttentionState``), continue its sequence and
        advance it by T; without, plain causal attention over the input.

        Returns logits (B, T, vocab), or (B, 1, vocab) with ``last_only`` (prefill needs
        only the last position: skips most of the vocabulary projection).
        """
        T = input_ids.shape[1]
        if state is None:
            positions = torch.arange(T, device=input_ids.device)
            return self.step(input_ids, positions, None, last_only=last_only)
        logits = self.step(input_ids, state.positions(T), state, last_only=last_only)
        state.advance(T)
        return logits

    def step(self, input_ids: torch.Tensor, positions: torch.Tensor, state,
             *, last_only: bool = False, rows: slice | None = None) -> torch.Tensor:
        """The pure compute of a forward call (no host-side bookkeeping): what gets compiled.
        ``rows``: only these positions' logits (B, len(rows), vocab), like ``last_only``."""
        x = self.embed_tokens(input_ids)  # (B, T, dim)
        cos, sin = self.rotary_emb(positions, x.dtype)  # (T, d)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, cos, sin, self.rotary_emb, None if state is None else state.layers[i])
        if last_only:
            x = x[:, -1:]
        elif rows is not None:
            x = x[:, rows]
        return self.lm_head(self.norm(x)).float()  # (B, T, vocab)
