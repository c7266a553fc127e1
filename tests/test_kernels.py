"""The Triton kernels of infllm_lite.kernels equal their torch twins (hypothesis; on the CPU
through triton's interpreter, TRITON_INTERPRET=1 from conftest.py; on a GPU with
TRITON_INTERPRET=0, on CUDA tensors); the twins equal a dense float64 formula; the
dispatchers pick the twin on the CPU; bad input raises InfLLMLiteError.

Tolerances: every kernel converts its inputs to float32 exactly (bfloat16 and float16
embed in float32), so the Triton kernel and its twin differ only by float32 rounding
order, whatever the input dtype: the bounds are float32 bounds scaled by the magnitudes
involved (the sums of |terms|).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infllm_lite.errors import InfLLMLiteError
from infllm_lite.kernels import block_relevance as br
from infllm_lite.kernels import representative_scores as rs
from infllm_lite.kernels import triton_state

PAD = -(1 << 41)  # padding query rows
EMPTY = 1 << 40  # unused key slots
FAR = -(1 << 40)  # selected-block slots
EPS32 = torch.finfo(torch.float32).eps
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

STATE = triton_state()  # conftest.py sets TRITON_INTERPRET before triton's first import
DEVICE = {"interpret": "cpu", "compile": "cuda" if torch.cuda.is_available() else None}.get(STATE)
SKIP_REASON = {"missing": "triton is not importable",
               "mixed": "TRITON_INTERPRET changed after triton was imported",
               "compile": "TRITON_INTERPRET=0 and no CUDA device"}.get(STATE, "")
needs_triton = pytest.mark.skipif(DEVICE is None, reason=SKIP_REASON)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- block relevance --------------------------------------------------------------------

def _block_bound(q_mean: torch.Tensor, block_repr: torch.Tensor, n: int) -> torch.Tensor:
    """Twice the float32 summation-error bound D·eps·Σ|q·r| (both sides carry one)."""
    D = q_mean.shape[1]
    mag = block_repr[:, :n].double().abs() @ q_mean.double().abs()[:, :, None]  # (B, n, 1)
    return 2 * (D + 2) * EPS32 * mag.squeeze(-1) + 1e-30


@needs_triton
@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), D=st.integers(1, 80), n_cap=st.integers(1, 40), frac=st.floats(0, 1),
       dtype=st.sampled_from(DTYPES), strided=st.booleans(), seed=st.integers(0, 2**31))
def test_block_scores_triton_equals_twin(B, D, n_cap, frac, dtype, strided, seed):
    g = _gen(seed)
    n = round(frac * n_cap)  # 0, n_cap and in between
    q_mean = torch.randn(B, 2 * D if strided else D, generator=g).to(dtype)  # (B, D) or wider
    if strided:
        q_mean = q_mean[:, ::2]  # a non-contiguous view
    block_repr = torch.randn(B, n_cap, D, generator=g)  # (B, N_cap, D) float32
    block_repr[:, n:] = float("nan")  # rows past n_blocks are never read
    q_mean, block_repr = q_mean.to(DEVICE), block_repr.to(DEVICE)
    got = br.block_scores_triton(q_mean, block_repr, n)
    want = br.block_scores_torch(q_mean, block_repr, n)
    assert got.shape == want.shape == (B, n) and got.dtype == torch.float32
    assert ((got - want).double().abs() <= _block_bound(q_mean, block_repr, n)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_scores_twin_equals_dense(dtype):
    g = _gen(1)
    q_mean = torch.randn(2, 100, generator=g).to(dtype)  # (B, D)
    block_repr = torch.randn(2, 9, 100, generator=g)  # (B, N_cap, D)
    want = torch.einsum("bd,bnd->bn", q_mean.double(), block_repr[:, :7].double())
    got = br.block_scores_torch(q_mean, block_repr, 7)
    assert got.dtype == torch.float32
    assert ((got.double() - want).abs() <= _block_bound(q_mean, block_repr, 7)).all()


def test_select_blocks_none_and_all():
    q_far = torch.randn(2, 3, 4, 5)  # (B, H, T, d)
    block_repr = torch.randn(2, 8, 15)  # (B, N_cap, H·d)
    assert br.select_blocks(q_far, block_repr, 0, 4) is None
    assert br.select_blocks(q_far, block_repr, 6, 0) is None
    for n in (1, 3, 4):
        got = br.select_blocks(q_far, block_repr, n, 4)
        assert got.dtype == torch.int64 and got.shape == (2, n)
        assert torch.equal(got, torch.arange(n).expand(2, n))


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), H=st.integers(1, 4), T=st.integers(1, 6), d=st.integers(1, 8),
       n=st.integers(1, 30), topk=st.integers(1, 30), ties=st.booleans(), seed=st.integers(0, 2**31))
def test_select_blocks_top_k(B, H, T, d, n, topk, ties, seed):
    g = _gen(seed)
    q_far = torch.randn(B, H, T, d, generator=g)  # (B, H, T, d)
    block_repr = torch.randn(B, n + 3, H * d, generator=g)  # (B, N_cap, H·d)
    if ties:  # exact ties: repeated representative vectors
        block_repr[:, 1::2] = block_repr[:, 0:1]
    got = br.select_blocks(q_far, block_repr, n, topk)
    k = min(n, topk)
    assert got.dtype == torch.int64 and got.shape == (B, k)
    assert (got >= 0).all() and (got < n).all()
    assert all(len(set(row.tolist())) == k for row in got)
    if n <= topk:
        assert torch.equal(got, torch.arange(n).expand(B, n))
        return
    scores = torch.einsum("bd,bnd->bn", q_far.double().mean(2).reshape(B, -1), block_repr[:, :n].double())
    picked = scores.gather(1, got).sort(dim=1, descending=True).values  # (B, k)
    best = scores.topk(k, dim=1).values  # (B, k), descending
    tol = 1e-5 * (1 + scores.abs().amax(dim=1, keepdim=True))
    assert ((picked - best).abs() <= tol).all()


def test_select_blocks_accepts_low_precision_queries():
    q_far = torch.randn(1, 2, 3, 4).bfloat16()  # (B, H, T, d)
    block_repr = torch.randn(1, 10, 8)  # (B, N_cap, H·d)
    want = br.block_scores_torch(q_far.float().mean(2).reshape(1, -1), block_repr, 10).topk(3).indices
    assert torch.equal(br.select_blocks(q_far, block_repr, 10, 3), want)


# --- representative scores ---------------------------------------------------------------

def _dense(q, k, q_pos, k_pos, lse, n_local) -> torch.Tensor:
    """(B, H, S) float64 by the definition, all logits at once (tiny sizes only)."""
    G = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(G, dim=1)  # (B, H, S, d)
    logits = q.double() @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    dist = q_pos[:, None] - k_pos[None, :]  # (T, S) int64
    visible = (dist >= 0) & (dist < n_local)
    p = torch.where(visible, (logits - lse.double()[..., None]).clamp(max=700), float("-inf")).exp()
    return p.sum(dim=2)


def _case(seed, B, Hkv, G, T, S, d, n_local, n_pad, dtype):
    """Inputs with sentinel positions: n_pad padding query rows, FAR and EMPTY key slots,
    real keys around the queries (before, inside, after the local window); lse of a real
    softmax over every key (plus a random share for keys elsewhere)."""
    g = _gen(seed)
    H = G * Hkv
    q = torch.randn(B, H, T, d, generator=g).to(dtype)  # (B, H, T, d)
    k = torch.randn(B, Hkv, S, d, generator=g).to(dtype)  # (B, Hkv, S, d)
    start = 1000
    q_pos = start + torch.arange(T)  # (T,)
    q_pos[T - n_pad:] = PAD
    kind = torch.randint(0, 4, (S,), generator=g)  # 0 FAR, 1 EMPTY, else real
    real = torch.randint(start - n_local - 3, start + T + 3, (S,), generator=g)
    k_pos = torch.where(kind == 0, FAR, torch.where(kind == 1, EMPTY, real))  # (S,)
    kk = k.double().repeat_interleave(G, dim=1)
    logits = q.double() @ kk.transpose(-1, -2) / math.sqrt(d)  # (B, H, T, S)
    lse = (logits.logsumexp(-1) + torch.rand(B, H, T, generator=g, dtype=torch.float64)).float()  # (B, H, T)
    if n_pad:  # padding rows: huge queries, garbage lse; never visible, so no effect
        q[:, :, T - n_pad:] = 1e4
        lse[:, :, T - n_pad:] = float("nan")
    return q, k, q_pos, k_pos, lse


def _rep_bound(q, k, q_pos, k_pos, lse, n_local) -> torch.Tensor:
    """Twice a float32 error bound of each sum: a term exp(x) carries x's error, about
    (d + 4)·eps·m with m = |q|·|k|/sqrt(d) + |lse| + 1 over the visible pairs, and the sum
    adds T·eps of itself."""
    d, T = q.shape[-1], q.shape[2]
    G = q.shape[1] // k.shape[1]
    p = _dense(q, k, q_pos, k_pos, lse, n_local)  # (B, H, S)
    qa, ka = q.double().abs(), k.double().abs().repeat_interleave(G, dim=1)
    m = (qa @ ka.transpose(-1, -2)) / math.sqrt(d) + lse.double().abs()[..., None] + 1  # (B, H, T, S)
    dist = q_pos[:, None] - k_pos[None, :]
    visible = (dist >= 0) & (dist < n_local)  # (T, S)
    m = torch.where(visible, m, 0.0).amax(dim=2) if T else torch.zeros_like(p)  # (B, H, S)
    return 2 * ((d + 4) * m + T + 2) * EPS32 * p + 1e-30


@needs_triton
@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.sampled_from([1, 3, 4]), T=st.integers(1, 40),
       S=st.integers(1, 40), d=st.sampled_from([1, 3, 5, 16, 24, 33, 64, 96]), n_local=st.integers(1, 50),
       pad_frac=st.floats(0, 1), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31))
def test_representative_scores_triton_equals_twin(B, Hkv, G, T, S, d, n_local, pad_frac, dtype, seed):
    n_pad = int(pad_frac * T) if pad_frac > 0.5 else 0  # half the cases without padding
    args = _case(seed, B, Hkv, G, T, S, d, n_local, n_pad, dtype)
    q, k, q_pos, k_pos, lse = (t.to(DEVICE) for t in args)
    got = rs.representative_scores_triton(q, k, q_pos, k_pos, lse, n_local)
    want = rs.representative_scores_torch(q, k, q_pos, k_pos, lse, n_local)
    assert got.shape == want.shape == (B, G * Hkv, S) and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert ((got - want).double().cpu().abs() <= _rep_bound(*args, n_local)).all()


@needs_triton
def test_representative_scores_triton_strided_inputs():
    q, k, q_pos, k_pos, lse = _case(3, 2, 2, 3, 21, 19, 12, 9, 4, torch.float32)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, (B, T, H, d) memory
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    lt = lse.transpose(1, 2).contiguous().transpose(1, 2)
    args = [t.to(DEVICE) for t in (qt, kt, q_pos, k_pos, lt)]
    got = rs.representative_scores_triton(*args, 9)
    want = rs.representative_scores_torch(q, k, q_pos, k_pos, lse, 9)
    assert ((got.cpu() - want).double().abs() <= _rep_bound(q, k, q_pos, k_pos, lse, 9)).all()


@pytest.mark.parametrize("chunk", [7, 256])
@pytest.mark.parametrize("dtype,G,T,d,n_pad", [(torch.float32, 3, 40, 16, 5), (torch.bfloat16, 1, 23, 7, 0),
                                               (torch.float16, 4, 300, 8, 9)])
def test_representative_twin_equals_dense(monkeypatch, chunk, dtype, G, T, d, n_pad):
    monkeypatch.setattr(rs, "QUERY_CHUNK", chunk)  # chunk borders inside the queries
    args = _case(5, 2, 2, G, T, 37, d, 12, n_pad, dtype)
    got = rs.representative_scores_torch(*args, 12)
    want = _dense(*args, 12)
    assert torch.isfinite(got).all()
    assert ((got.double() - want).abs() <= _rep_bound(*args, 12)).all()
    assert (want > 0).any()  # the case sees something


def test_representative_hidden_pairs_are_zero():
    """Sentinels, future keys and keys past the window contribute exactly 0."""
    q, k, _, _, lse = _case(0, 1, 1, 1, 3, 5, 4, 4, 0, torch.float32)
    q_pos = torch.tensor([10, 11, PAD])
    k_pos = torch.tensor([FAR, EMPTY, 12, 7, 11])  # 12: future; 7: seen by 10 only (11 - 7 = n_local)
    lse[..., 2] = float("inf")
    for fn in (rs.representative_scores_torch,) + ((rs.representative_scores_triton,) if DEVICE else ()):
        out = fn(*(t.to(DEVICE or "cpu") for t in (q, k, q_pos, k_pos, lse)), 4).cpu()
        assert torch.equal(out[..., :3], torch.zeros(1, 1, 3))
        assert (out[..., 3] > 0).all() and (out[..., 4] > 0).all()  # 7 seen by 10, 11 by 11


def test_representative_empty_sizes():
    for T, S in ((0, 5), (4, 0)):
        q, k = torch.randn(1, 2, T, 8), torch.randn(1, 1, S, 8)
        args = (q, k, torch.arange(T), torch.arange(S), torch.zeros(1, 2, T), 4)
        fns = (rs.representative_scores_torch,) + ((rs.representative_scores_triton,) if DEVICE else ())
        for fn in fns:
            out = fn(*(a.to(DEVICE or "cpu") if torch.is_tensor(a) else a for a in args)).cpu()
            assert out.shape == (1, 2, S) and (out == 0).all()


# --- dispatchers, errors, missing triton ---------------------------------------------------

def test_dispatchers_pick_torch_on_cpu(monkeypatch):
    def boom(*args):
        raise AssertionError("Triton launched for CPU tensors")

    monkeypatch.setattr(br, "block_scores_triton", boom)
    monkeypatch.setattr(rs, "representative_scores_triton", boom)
    q_mean, block_repr = torch.randn(2, 6), torch.randn(2, 5, 6)
    assert torch.equal(br.block_scores(q_mean, block_repr, 4), br.block_scores_torch(q_mean, block_repr, 4))
    assert br.select_blocks(torch.randn(2, 2, 3, 3), block_repr, 5, 2).shape == (2, 2)
    args = _case(1, 1, 2, 2, 6, 7, 4, 5, 1, torch.float32)
    assert torch.equal(rs.representative_scores(*args, 5), rs.representative_scores_torch(*args, 5))


@needs_triton
def test_mode_change_after_import_is_refused(monkeypatch):
    """Triton's mode is fixed at its import; a launch after TRITON_INTERPRET changed says so."""
    monkeypatch.setenv("TRITON_INTERPRET", "0" if STATE == "interpret" else "1")
    with pytest.raises(InfLLMLiteError, match="before the first `import triton`"):
        br.block_scores_triton(torch.randn(1, 4, device=DEVICE), torch.randn(1, 3, 4, device=DEVICE), 2)
    args = (t.to(DEVICE) for t in _case(0, 1, 1, 1, 2, 3, 4, 4, 0, torch.float32))
    with pytest.raises(InfLLMLiteError, match="before the first `import triton`"):
        rs.representative_scores_triton(*args, 4)


def _bad_block(**kw):
    args = {"q_mean": torch.randn(2, 6), "block_repr": torch.randn(2, 5, 6), "n_blocks": 3}
    args.update(kw)
    return lambda fn: fn(**args)


def _bad_rep(**kw):
    B, H, Hkv, T, S, d = 1, 4, 2, 3, 5, 8
    args = {"q": torch.randn(B, H, T, d), "k": torch.randn(B, Hkv, S, d), "q_pos": torch.arange(T),
            "k_pos": torch.arange(S), "lse": torch.zeros(B, H, T), "n_local": 4}
    args.update(kw)
    return lambda fn: fn(**args)


BLOCK_FNS = [br.block_scores, br.block_scores_torch, br.block_scores_triton]
REP_FNS = [rs.representative_scores, rs.representative_scores_torch, rs.representative_scores_triton]


@pytest.mark.parametrize("call,match", [
    (_bad_block(q_mean=torch.randn(2, 1, 6)), r"q_mean must be \(B, D\)"),
    (_bad_block(block_repr=torch.randn(2, 30)), r"block_repr must be \(B, N_cap, D\)"),
    (_bad_block(block_repr=torch.randn(2, 5, 7)), "disagree on B or D"),
    (_bad_block(block_repr=torch.randn(3, 5, 6)), "disagree on B or D"),
    (_bad_block(n_blocks=6), r"n_blocks=6 outside \[0, N_cap=5\]"),
    (_bad_block(n_blocks=-1), "outside"),
    (_bad_block(q_mean=torch.ones(2, 6, dtype=torch.long)), "need floating tensors"),
])
@pytest.mark.parametrize("fn", BLOCK_FNS, ids=lambda f: f.__name__)
def test_block_scores_bad_input(fn, call, match):
    with pytest.raises(InfLLMLiteError, match=match):
        call(fn)


@pytest.mark.parametrize("call,match", [
    (_bad_rep(q=torch.randn(4, 3, 8)), r"q must be \(B, H, T, d\)"),
    (_bad_rep(k=torch.randn(2, 5, 8)), r"k must be \(B, Hkv, S, d\)"),
    (_bad_rep(k=torch.randn(1, 2, 5, 7)), "disagree on B or d"),
    (_bad_rep(k=torch.randn(1, 3, 5, 8)), "H=4 query heads is not a multiple of Hkv=3"),
    (_bad_rep(q_pos=torch.arange(4)), r"q_pos must be \(T,\)"),
    (_bad_rep(k_pos=torch.arange(5)[None]), r"k_pos must be \(S,\)"),
    (_bad_rep(lse=torch.zeros(1, 2, 3)), r"lse must be \(B, H, T\)"),
    (_bad_rep(q_pos=torch.arange(3.0)), "positions must be integers"),
    (_bad_rep(q=torch.ones(1, 4, 3, 8, dtype=torch.int32)), "must be floating"),
    (_bad_rep(n_local=-1), "n_local must be >= 0"),
])
@pytest.mark.parametrize("fn", REP_FNS, ids=lambda f: f.__name__)
def test_representative_scores_bad_input(fn, call, match):
    with pytest.raises(InfLLMLiteError, match=match):
        call(fn)


def test_select_blocks_bad_input():
    block_repr = torch.randn(1, 4, 6)
    with pytest.raises(InfLLMLiteError, match=r"q_far must be \(B, H, T, d\)"):
        br.select_blocks(torch.randn(1, 3, 2), block_repr, 4, 2)
    with pytest.raises(InfLLMLiteError, match="topk must be >= 0"):
        br.select_blocks(torch.randn(1, 2, 3, 3), block_repr, 4, -1)
    with pytest.raises(InfLLMLiteError, match="disagree on B or D"):
        br.select_blocks(torch.randn(1, 2, 3, 4), block_repr, 4, 2)  # H·d = 8 != 6


def _run(code: str, **env: str) -> None:
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=environ, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_library_imports_without_triton():
    """With triton unimportable the package imports, dispatchers use the twins, and the
    Triton entry points say triton is missing."""
    _run("""
import sys
sys.modules["triton"] = None  # import triton -> ImportError
import torch
from infllm_lite.errors import InfLLMLiteError
from infllm_lite.kernels import block_relevance as br, representative_scores as rs, triton_state
assert triton_state() == "missing"
assert br.block_scores(torch.ones(1, 2), torch.ones(1, 3, 2), 3).tolist() == [[2.0, 2.0, 2.0]]
out = rs.representative_scores(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), torch.tensor([5]),
                               torch.tensor([5]), torch.zeros(1, 1, 1), 1)
assert out.tolist() == [[[1.0]]]
try:
    br.block_scores_triton(torch.ones(1, 2), torch.ones(1, 3, 2), 3)
except InfLLMLiteError as e:
    assert "triton is not installed" in str(e), e
else:
    raise SystemExit("no error")
print("ok")
""")


@pytest.mark.skipif(STATE == "missing", reason="triton is not importable")
def test_interpreter_needs_the_variable_before_triton():
    """Imported without TRITON_INTERPRET, a CPU launch is refused with the fix in the
    message; setting the variable afterwards is refused too (triton 3.9 decorated its
    tl.sum and tl.max at import)."""
    _run("""
import os, torch
from infllm_lite.errors import InfLLMLiteError
from infllm_lite.kernels import block_relevance as br, triton_state
assert triton_state() == "compile"
for env, match in (("0", "Triton needs CUDA, or TRITON_INTERPRET=1"), ("1", "TRITON_INTERPRET=1 now")):
    os.environ["TRITON_INTERPRET"] = env
    try:
        br.block_scores_triton(torch.ones(1, 2), torch.ones(1, 3, 2), 3)
    except InfLLMLiteError as e:
        assert match in str(e) and "before the first `import triton`" in str(e), e
    else:
        raise SystemExit("no error")
print("ok")
""")
