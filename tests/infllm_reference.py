"""A slow, obviously-correct dense reference of one InfLLM attention layer (SPEC §3–§6).

Written from SPEC.md alone, independently of ``infllm_lite.attention.infllm``: it loops
over execution chunks and queries, materialises the visibility rule of §4 per query and
token, and computes in float64. Tests hold every fast path to it.

Conventions (resolutions of points SPEC leaves implicit, see also the test module):

* Execution chunks: each model call ``[c, c + T)`` is cut into ``[c, c + E), [c + E,
  c + 2E), …`` with ``E = exc_block_size``, the last one possibly shorter (§4).
* "The pending remainder as of the start of the chunk" (§3/§4): the formed-block count
  ``F`` is the one at the start of the chunk (blocks only form *after* a chunk, so it is
  constant within the chunk); whether a token is far is decided per query
  (``i - j >= n_local``). A far token ``j >= n_init + F·B`` is therefore visible to query
  ``i`` even when it was still local to the chunk's first query. This is the reading under
  which every past token is visible exactly once whenever all blocks are selected, for any
  chunking (§4 consequence 2 holds beyond one-token chunks), and no token is seen twice (§9).
* RoPE angles are ``position · inv_freq`` in float64, exact, as the model's
  ``RotaryEmbedding`` forms them (so positions near a million are as exact as small
  ones), then cos/sin and everything after in float64.
* Ties (scores exactly equal) are broken by the lower index, both for representative
  tokens and for retrieval; SPEC says ties do not matter, and tests accept any near-tie choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from infllm_lite.memory_config import MemoryConfig


@dataclass
class ReferenceResult:
    out: torch.Tensor  # (B, H, L, d) float64
    # per execution chunk, in order: (start, end, selected) with selected[r] the sorted list of
    # block indices selected for batch row r (the ones used: forced ones when forced)
    chunks: list[tuple[int, int, list[list[int]]]]
    block_repr: torch.Tensor  # (B, n_blocks, H*d) float64
    n_blocks: int
    scores: torch.Tensor  # (B, H, L) float64: accumulated local scores score_h(j) (§5)
    # per execution chunk: (B, F) retrieval scores q̄·vec_b of the F blocks formed at its start,
    # or None when F <= topk (everything selected, nothing scored)
    retrieval_scores: list[torch.Tensor | None] = field(default_factory=list)
    own_selected: list[list[list[int]]] = field(default_factory=list)  # reference's own top-k per chunk
    blocks_at_start: list[int] = field(default_factory=list)  # F per chunk


def execution_chunks(call_sizes: list[int], exc_block_size: int) -> list[tuple[int, int]]:
    """(start, end) of every execution chunk: each call cut from its own start (§4)."""
    chunks = []
    start = 0
    for size in call_sizes:
        if size <= 0:
            raise ValueError(f"call sizes must be positive, got {call_sizes}")
        end_of_call = start + size
        s = start
        while s < end_of_call:
            e = min(s + exc_block_size, end_of_call)
            chunks.append((s, e))
            s = e
        start = end_of_call
    return chunks


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_at(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, d) float64 by the angles of positions (T,)."""
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]  # (T, d/2)
    emb = torch.cat((angles, angles), dim=-1)  # (T, d)
    return x * emb.cos() + rotate_half(x) * emb.sin()


def _top_indices(values: list[float], k: int) -> list[int]:
    """Indices of the k largest values (ties: lower index first)."""
    order = sorted(range(len(values)), key=lambda idx: (-values[idx], idx))
    return order[:k]


def reference_infllm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: MemoryConfig,
                     call_sizes: list[int], inv_freq: torch.Tensor,
                     force_selected: list[list[list[int]]] | None = None) -> ReferenceResult:
    """One InfLLM layer over a whole sequence, by the letter of SPEC §3–§6.

    q: (B, H, L, d); k, v: (B, Hkv, L, d), un-rotated, tokens at positions 0..L-1.
    call_sizes: the model calls the sequence went through (sum L). inv_freq: (d/2,).
    force_selected: optional, per execution chunk, per batch row, the block indices to use
    instead of the reference's own top-k (so a test can follow a fast path's equally valid
    choice on a near-tie); the reference's own choice and scores are still recorded.
    """
    B, H, L, d = q.shape
    Hkv = k.shape[1]
    assert k.shape == (B, Hkv, L, d) and v.shape == (B, Hkv, L, d)
    assert H % Hkv == 0 and sum(call_sizes) == L
    group = H // Hkv
    n_init, n_local, bs = config.n_init, config.n_local, config.block_size
    topk, repr_topk = config.topk, config.repr_topk

    qd, kd, vd = q.to(torch.float64), k.to(torch.float64), v.to(torch.float64)
    kv_head = [h // group for h in range(H)]  # GQA: query head h reads kv head h // (H/Hkv)
    k_raw = kd[:, kv_head]  # (B, H, L, d) raw keys of the kv head each query head reads
    v_h = vd[:, kv_head]  # (B, H, L, d)
    pos = torch.arange(L)
    q_true = rope_at(qd, pos, inv_freq)  # rope(q_i, i)
    k_true = rope_at(k_raw, pos, inv_freq)  # rope(k_j, j)
    q_one_angle = rope_at(qd, torch.full((L,), n_local - 1), inv_freq)  # rope(q_i, n_local - 1)
    scale = 1.0 / math.sqrt(d)

    out = torch.zeros(B, H, L, d, dtype=torch.float64)
    scores = torch.zeros(B, H, L, dtype=torch.float64)
    reprs: list[torch.Tensor] = []  # each (B, H*d)
    result = ReferenceResult(out=out, chunks=[], block_repr=torch.zeros(B, 0, H * d, dtype=torch.float64),
                             n_blocks=0, scores=scores)

    chunks = execution_chunks(call_sizes, config.exc_block_size)
    if force_selected is not None:
        assert len(force_selected) == len(chunks), "one forced selection per execution chunk"

    for c, (s, e) in enumerate(chunks):
        F = len(reprs)  # blocks formed as of the start of this chunk
        result.blocks_at_start.append(F)

        # §6 retrieval, once per chunk, per batch row, shared by the heads
        if F <= topk:
            own = [list(range(F)) for _ in range(B)]
            result.retrieval_scores.append(None)
        else:
            q_bar = q_one_angle[:, :, s:e].mean(dim=2).reshape(B, H * d)  # (B, H*d)
            vecs = torch.stack(reprs, dim=1)  # (B, F, H*d)
            rscore = torch.einsum("bx,bfx->bf", q_bar, vecs)  # (B, F)
            result.retrieval_scores.append(rscore)
            own = [sorted(_top_indices(rscore[r].tolist(), topk)) for r in range(B)]
        result.own_selected.append(own)
        selected = own if force_selected is None else [sorted(row) for row in force_selected[c]]

        # far-visibility of every token so far, per batch row (independent of the query)
        rows = []
        for r in range(B):
            row = []
            for j in range(e):
                if j < n_init:
                    row.append(True)  # initial token
                elif j >= n_init + F * bs:
                    row.append(True)  # pending remainder: past the formed blocks
                else:
                    row.append((j - n_init) // bs in selected[r])  # in a formed block: if selected
            rows.append(row)
        far_visible = torch.tensor(rows, dtype=torch.bool).reshape(B, e)

        # §4 attention, query by query
        for i in range(s, e):
            j = torch.arange(i + 1)
            local = (i - j) < n_local  # (i+1,)
            visible = local[None, :] | far_visible[:, : i + 1]  # (B, i+1)
            logit_local = (q_true[:, :, i, None, :] * k_true[:, :, : i + 1]).sum(-1) * scale  # (B, H, i+1)
            logit_far = (q_one_angle[:, :, i, None, :] * k_raw[:, :, : i + 1]).sum(-1) * scale
            logits = torch.where(local[None, None, :], logit_local, logit_far)
            logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
            p = torch.softmax(logits, dim=-1)  # one softmax over local and far
            out[:, :, i] = torch.einsum("bhj,bhjd->bhd", p, v_h[:, :, : i + 1])
            scores[:, :, : i + 1] += p * local[None, None, :]  # §5: local part only

        result.chunks.append((s, e, selected))

        # §3 block formation, t = last processed token
        t = e - 1
        while n_init + (len(reprs) + 1) * bs - 1 <= t - n_local:
            lo = n_init + len(reprs) * bs
            vec = torch.zeros(B, H, d, dtype=torch.float64)
            for r in range(B):
                for h in range(H):
                    idx = _top_indices(scores[r, h, lo:lo + bs].tolist(), repr_topk)
                    vec[r, h] = k_raw[r, h, [lo + x for x in idx]].mean(dim=0)
            reprs.append(vec.reshape(B, H * d))

    result.n_blocks = len(reprs)
    if reprs:
        result.block_repr = torch.stack(reprs, dim=1)
    return result
