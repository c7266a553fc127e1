"""Weight-only quantized linears (models/quantized.py), GGUF blocks kept packed
(weights/gguf.py) and ``load_model(quantize=...)``.

Tolerances, each quantized layer against its float32 twin ``x @ dequantize().T`` on the
same pack (``A = |x| @ |Ŵ|ᵀ``, the sum of the products' magnitudes):

* ``dequant`` kernel: float32 throughout, only the summation order differs: at most
  ``K · 2⁻²³ · A`` (the standard bound ``γ_K``, with ``u = 2⁻²⁴``).
* ``packed`` kernel: ``x`` rounded to bf16 (relative ``2⁻⁹`` each), the scale (and int4's
  zero ``z = o + 8 s``) rounded to bf16 (``2⁻⁹ (|q - 8| s + |z|)`` per weight, which can
  exceed ``|ŵ|``: ``M`` is that magnitude plus ``|ŵ|``), float32 accumulation, the
  output rounded to bf16 (``2⁻⁹ |y| ≤ 2⁻⁹ A``): at most about ``3 · 2⁻⁹ · (|x| @ Mᵀ)``;
  the test allows ``2⁻⁷ · (|x| @ Mᵀ)`` (a third more).
* ``packed`` kernel over more than ``PREFILL_ROWS`` rows with the ``bf16`` prefill: ``x``
  and the float32 dequantization each rounded to bf16 once (``2⁻⁹`` relative each),
  float32 accumulation, the output rounded to bf16: at most about ``3 · 2⁻⁹ · (|x| @ |Ŵ|ᵀ)``,
  inside the same allowance (``M ≥ |Ŵ|``).
"""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infllm_lite import generate, load_model
from infllm_lite.errors import InfLLMLiteError
from infllm_lite.models.linear import Linear
from infllm_lite.models.quantized import (
    PREFILL_ROWS, QuantizedLinear, check_quantize, dequantize_int4, kernels_used, model_kernels, pack_int4,
    prefill_kernel, quant_kernel, quantize_int4, quantize_int8, quantize_model, set_prefill_kernel,
    set_quant_kernel, unpack_int4, weights_bytes)
from infllm_lite.models import quantized
from infllm_lite.weights.gguf import gguf_pack

FAST = settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------- packing


@FAST
@given(out=st.integers(1, 40), groups=st.integers(1, 4), group=st.sampled_from([32, 64, 128]),
       seed=st.integers(0, 2**16))
def test_int4_pack_unpack_exact(out, groups, group, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out, groups * group), generator=g, dtype=torch.uint8)
    packed = pack_int4(q, group)
    assert packed.shape == (out, groups, group // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    raw = torch.randint(0, 256, packed.shape, generator=g, dtype=torch.uint8)
    assert torch.equal(pack_int4(unpack_int4(raw), group), raw)  # every byte is a pack


@FAST
@given(out=st.integers(1, 24), groups=st.integers(1, 3), group=st.sampled_from([32, 64, 128]),
       seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 0.1, 3.0]))
def test_quantization_error_is_half_a_step(out, groups, group, seed, scale):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, groups * group, generator=g) * scale
    q, s = quantize_int8(w)
    ŵ = q.float() * s
    assert ((ŵ - w).abs() <= s * (0.5 + 1e-5)).all()
    packed, s4, o4 = quantize_int4(w, group)
    ŵ4 = dequantize_int4(packed, s4, o4).reshape(out, groups, group)
    step = s4.float()[..., None]
    # half a step, plus what the float16 offset/scale rounding may push past the clamp
    bound = 0.5 * step + 2**-9 * w.reshape(out, groups, group).abs().amax(-1, keepdim=True)
    assert ((ŵ4 - w.reshape(out, groups, group)).abs() <= bound).all()


@pytest.mark.parametrize("n, group", [(48, 32), (96, 64), (100, 32)])
def test_sizes_not_a_multiple_of_the_group_are_refused(n, group):
    with pytest.raises(InfLLMLiteError, match=f"group size {group} does not divide the input size {n}"):
        quantize_int4(torch.randn(4, n), group)
    with pytest.raises(InfLLMLiteError, match="does not divide"):
        pack_int4(torch.zeros(4, n, dtype=torch.uint8), group)


# ---------------------------------------------------------------- each layer against its twin


def _magnitudes(layer: QuantizedLinear) -> torch.Tensor:
    """|ŵ| plus, for int4, the bf16-rounded parts' magnitudes |q - 8| s + |o + 8 s|."""
    m = layer.dequantize().abs()
    if layer.scheme == "int4":
        q = unpack_int4(layer.qweight).float().reshape(layer.out_features, -1, layer.group_size)
        s, o = layer.scales.float()[..., None], layer.offsets.float()[..., None]
        m = m + ((q - 8).abs() * s + (o + 8 * s).abs()).reshape(m.shape)
    return m


@FAST
@given(scheme=st.sampled_from(["int8", "int4"]), kernel=st.sampled_from(["packed", "dequant"]),
       out16=st.integers(1, 6), groups=st.integers(1, 4), group=st.sampled_from([32, 64, 128]),
       rows=st.sampled_from([1, 3, 17, 70]), prefill=st.sampled_from(["bf16", "float32"]), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_quantized_linear_matches_its_float32_twin(scheme, kernel, out16, groups, group, rows, prefill, bias, seed):
    g = torch.Generator().manual_seed(seed)
    out, n = 16 * out16, groups * group
    w = torch.randn(out, n, generator=g) * 0.1
    b = torch.randn(out, generator=g) if bias else None
    layer = QuantizedLinear.from_float(w, b, scheme, group if scheme == "int4" else None).prepare(kernel, prefill)
    assert layer.kernel == kernel  # every shape here is one the packed kernels take
    assert layer.prefill_bf16 == (kernel == "packed" and prefill == "bf16")  # dequant stays float32
    x = torch.randn(2, rows, n, generator=g)  # 70: 140 rows, past PREFILL_ROWS
    twin = x @ layer.dequantize().T + (b if bias else 0)
    y = layer(x)
    assert y.shape == twin.shape and y.dtype == torch.float32
    if kernel == "dequant":
        tol = n * 2**-23 * (x.abs() @ layer.dequantize().abs().T) + 1e-7
    else:
        tol = 2**-7 * (x.abs() @ _magnitudes(layer).T) + 1e-6
    assert ((y - twin).abs() <= tol).all()


@pytest.mark.parametrize("rows", [1, 5, 40])  # 40: past FEW_ROWS, dequantized
def test_grouped_int8_q8_0_matches_its_twin_on_both_kernels(rows):
    raw = _random_blocks("Q8_0", 48, 3, seed=rows)
    x = torch.randn(rows, 96)
    for kernel in ("packed", "dequant"):
        layer = gguf_pack(raw, "Q8_0", (48, 96)).prepare(kernel)
        assert layer.kernel == kernel and layer.label == f"int8/g32:{kernel}-{'bf16' if kernel == 'packed' else 'f32'}"
        twin = x @ layer.dequantize().T
        bound = (2**-7 if kernel == "packed" and rows <= 16 else 96 * 2**-23) * (x.abs() @ layer.dequantize().abs().T)
        assert ((layer(x) - twin).abs() <= bound + 1e-7).all()
        assert torch.equal(layer.dequantize(), gguf_pack(raw, "Q8_0", (48, 96)).dequantize())  # same bytes


def test_layers_the_packed_kernels_do_not_take_dequantize():
    odd = QuantizedLinear.from_float(torch.randn(40, 64), None, "int4", 32).prepare("packed")
    assert odd.kernel == "dequant" and odd.label == "int4:dequant-f32"  # 40 rows: not a multiple of 16
    x = torch.randn(3, 64)
    torch.testing.assert_close(odd(x), x @ odd.dequantize().T, rtol=0, atol=1e-5)


@pytest.mark.parametrize("setter, getter, env, bad, unknown, choices, good", [
    (set_quant_kernel, quant_kernel, "INFLLM_LITE_QUANT_KERNEL", "fast", "quantized kernel", "packed, dequant", "dequant"),
    (set_prefill_kernel, prefill_kernel, "INFLLM_LITE_QUANT_PREFILL", "fp8", "quantized prefill kernel",
     "bf16, float32", "bf16")])
def test_kernel_overrides_are_validated(monkeypatch, setter, getter, env, bad, unknown, choices, good):
    with pytest.raises(InfLLMLiteError, match=f"unknown {unknown} '{bad}'.*{choices}"):
        setter(bad)
    setter(None)
    monkeypatch.setenv(env, bad)
    with pytest.raises(InfLLMLiteError, match=f"{env}='{bad}': choose one of {choices}"):
        getter("int8")
    monkeypatch.setenv(env, good)
    assert getter("int4") == good
    setter(None)  # the next user probes again


def test_prefill_kernel_is_float32_without_bf16_instructions(monkeypatch):
    monkeypatch.delenv("INFLLM_LITE_QUANT_PREFILL", raising=False)
    monkeypatch.setattr(quantized, "fast_bf16_cpu", lambda: False)  # no bf16 instructions: no probe, float32
    assert prefill_kernel("int8") == "float32"
    set_prefill_kernel(None)  # the next user probes again


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_bf16_prefill_rows_do_not_depend_on_the_other_rows_and_are_recorded(scheme):
    """What lets batch-1 prefill in calls of any size give the same bits."""
    layer = QuantizedLinear.from_float(torch.randn(64, 96), None, scheme, 32 if scheme == "int4" else None)
    layer.prepare("packed", "bf16")
    x = torch.randn(2 * PREFILL_ROWS + 90, 96)
    y = layer(x)
    assert torch.equal(y[:PREFILL_ROWS + 1], layer(x[:PREFILL_ROWS + 1]))
    assert torch.equal(y[PREFILL_ROWS + 1:], layer(x[PREFILL_ROWS + 1:]))
    assert f"{scheme}:dequant-bf16" in kernels_used()  # what GenerationStats.linear_kernels reports


# ---------------------------------------------------------------- GGUF blocks


BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q4_K": 144, "Q6_K": 210}
BLOCK_WEIGHTS = {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q4_K": 256, "Q6_K": 256}
F16_AT = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q6_K": [208]}  # where the float16 scales sit


def _random_blocks(kind: str, rows: int, blocks: int, seed: int) -> np.ndarray:
    """Random bytes, with finite float16 scales where the format has them."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, blocks, BLOCK_BYTES[kind]), dtype=np.uint8)
    for at in F16_AT[kind]:
        raw[..., at:at + 2] = (rng.standard_normal((rows, blocks, 1)) * 0.01).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, blocks * BLOCK_BYTES[kind])


@FAST
@given(kind=st.sampled_from(list(BLOCK_BYTES)), rows=st.integers(1, 8), blocks=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_gguf_blocks_unpack_to_gguf_dequantization_exactly(kind, rows, blocks, seed):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = _random_blocks(kind, rows, blocks, seed)
    expected = torch.from_numpy(np.asarray(dequantize(raw, GGMLQuantizationType[kind]), dtype=np.float32))
    layer = gguf_pack(raw, kind, (rows, blocks * BLOCK_WEIGHTS[kind]))
    assert torch.equal(layer.dequantize(), expected)


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_k_quant_layers_match_their_twin_on_the_packed_kernel(kind):
    layer = gguf_pack(_random_blocks(kind, 32, 2, seed=1), kind, (32, 512)).prepare("packed")
    assert layer.kernel == "packed"
    x = torch.randn(2, 512)
    twin = x @ layer.dequantize().T
    assert ((layer(x) - twin).abs() <= 2**-7 * (x.abs() @ _magnitudes(layer).T) + 1e-6).all()


def test_the_embedded_files_blocks_unpack_exactly(gguf_path):
    from gguf.quants import dequantize

    from infllm_lite.weights.gguf import _reader_class  # GGUFReader, 3x faster to open

    reader = _reader_class()(gguf_path)
    seen = set()
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind in ("Q8_0", "Q4_1") and kind not in seen:
            seen.add(kind)
            rows = np.asarray(t.data[:64])  # a slice: the whole embedding would take a while
            expected = torch.from_numpy(np.asarray(dequantize(rows, t.tensor_type), dtype=np.float32))
            assert torch.equal(gguf_pack(rows, kind, (64, int(t.shape[0]))).dequantize(), expected)
    assert seen == {"Q8_0", "Q4_1"}


def test_gguf_types_not_packed_are_refused():
    with pytest.raises(InfLLMLiteError, match="Q5_K is not packed here"):
        gguf_pack(np.zeros((2, 176), np.uint8), "Q5_K", (2, 256))


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("quantize, group, message", [
    ("int5", None, "unknown quantize value 'int5': choose one of int8, int4, gguf"),
    ("int4", 48, "int4 group size 48: choose one of 32, 64, 128"),
    ("int4", 256, "int4 group size 256"),
    ("int8", 64, "group_size applies only with quantize='int4' \\(int8 is per-channel\\)"),
    ("gguf", 32, "group_size applies only with quantize='int4'"),
    (None, 32, "group_size applies only with quantize='int4'"),
])
def test_bad_quantize_values_are_refused_before_any_work(quantize, group, message):
    with pytest.raises(InfLLMLiteError, match=message):
        check_quantize(quantize, group)
    with pytest.raises(InfLLMLiteError, match=message):  # before the source is even looked at
        load_model("/no/such/model", quantize=quantize, group_size=group, progress=False)


def test_group_size_that_does_not_divide_the_model_is_refused(tiny_folder):
    with pytest.raises(InfLLMLiteError, match="int4 group size 64 does not divide the model's intermediate size 96: choose 32"):
        load_model(tiny_folder, quantize="int4", group_size=64, device="cpu", progress=False)
    with pytest.raises(InfLLMLiteError, match="quantize='gguf' needs a .gguf file"):
        load_model(tiny_folder, quantize="gguf", device="cpu", progress=False)


# ---------------------------------------------------------------- models


def _twin(float_model, quantized):
    """``float_model`` with every quantized layer's weight replaced by its dequantization."""
    twin = copy.deepcopy(float_model)
    for name, module in quantized.named_modules(remove_duplicate=False):
        if isinstance(module, QuantizedLinear) and not name.endswith(".table"):  # a tied head's twin is the embedding
            with torch.no_grad():
                twin.get_submodule(name).weight.copy_(module.dequantize())
    return twin


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_tiny_model_generates_as_its_twin(tiny, scheme):
    model, tok = tiny
    q = quantize_model(copy.deepcopy(model), scheme, 32 if scheme == "int4" else None, kernel="dequant")
    assert not any(isinstance(m, Linear) for m in q.modules())
    assert weights_bytes(q) < weights_bytes(model) / 2
    twin = _twin(model, q)
    ids = torch.tensor([tok.encode("Once upon a time")])
    with torch.inference_mode():
        torch.testing.assert_close(q(ids), twin(ids), rtol=0, atol=1e-4)
    text, stats = generate(q, tok, "Once upon a time", max_new_tokens=8, return_stats=True)
    assert text == generate(twin, tok, "Once upon a time", max_new_tokens=8)
    assert f"{scheme}:dequant-f32" in stats.linear_kernels and "linear kernels" in stats.summary()


def test_int8_model_through_the_batched_engine(tiny):
    model, tok = tiny
    prompts = ["Once upon a time", "The capital of France is"]
    for kernel in ("dequant", "packed"):
        q = quantize_model(copy.deepcopy(model), "int8", kernel=kernel)
        alone = [generate(q, tok, p, max_new_tokens=6) for p in prompts]
        assert generate(q, tok, prompts, max_new_tokens=6) == alone


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_packed_kernels_rows_do_not_depend_on_the_other_rows(scheme):
    """What lets a batched decode step with the packed kernels equal each sequence alone."""
    layer = QuantizedLinear.from_float(torch.randn(64, 96), None, scheme, 32 if scheme == "int4" else None)
    layer.prepare("packed")
    x = torch.randn(8, 96)
    assert torch.equal(layer(x), torch.cat([layer(x[i:i + 1]) for i in range(8)]))


PASSAGE = ("The river valley has a long history. Farmers grew wheat and barley on its banks, and traders "
           "carried salt, copper and cloth along the roads that followed the water. Every spring the "
           "snow melted in the mountains and the river rose, covering the fields with fresh soil. The "
           "towns built walls and bridges, and the bridges were rebuilt after every great flood. Today "
           "a railway runs beside the old road, and the fields still grow wheat, barley and grapes.")


def _perplexity(model, ids) -> float:
    with torch.inference_mode():
        logits = model(ids)
    return torch.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])).item()


@pytest.fixture(scope="module")
def gguf_packed():
    return load_model(quantize="gguf", device="cpu", progress=False)[0]


def test_embedded_model_quantized_keeps_its_answers_and_perplexity(smollm, gguf_packed):
    """Measured here (90 tokens): perplexity float32 30.43, gguf 30.27 (its weights are the
    float32 model's exactly: the difference is the bf16 activations), int8 30.20, int4/g32
    31.69 (int4 re-quantizes weights that were Q4_1 already); gguf and int8 give float32's
    greedy answer to the question. Margins: gguf 2%, int8 3%, int4 8%."""
    model, tok = smollm
    ids = torch.tensor([tok.encode(PASSAGE)])
    base = _perplexity(model, ids)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answer = generate(model, tok, question, max_new_tokens=12)
    assert answer == "The capital of France is Paris."
    variants = {"gguf": (gguf_packed, 0.02), "int8": (quantize_model(copy.deepcopy(model), "int8"), 0.03),
                "int4": (quantize_model(copy.deepcopy(model), "int4", 32), 0.08)}
    for name, (q, margin) in variants.items():
        assert abs(_perplexity(q, ids) / base - 1) < margin, name
        if name != "int4":
            assert generate(q, tok, question, max_new_tokens=12) == answer, name


def test_embedded_gguf_kept_packed_equals_the_float32_weights(smollm, gguf_packed):
    model, tok = smollm
    packed = gguf_packed
    assert packed.quantization == "gguf"
    kernels = model_kernels(packed)  # the 210 Q4_1 layers (kernel: this machine's), the Q8_0 head
    assert "int8/g32:" in kernels and "x1" in kernels and "int4:" in kernels and "x210" in kernels
    assert weights_bytes(packed) < 0.35 * weights_bytes(model)
    for name in ("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.29.mlp.down_proj", "lm_head"):
        assert torch.equal(packed.get_submodule(name).dequantize(), model.get_submodule(name).weight)
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.inference_mode():
        want = model(ids)[0, -1]
        got = packed(ids)[0, -1]
    assert got.argmax() == want.argmax()
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_embedded_gguf_bf16_prefill_keeps_the_perplexity(smollm, gguf_packed):
    """The bf16 GEMM on prompts past PREFILL_ROWS (here 180 tokens) against the packed
    kernel on the same layers: measured here perplexity 6.612 (packed) and 6.616 (bf16;
    the passage repeated is easy), the same next token, last-token logits up to 0.24
    apart (of 15.9). Margins: perplexity 1%, logits 3% of the largest."""
    _, tok = smollm
    ids = torch.tensor([tok.encode(PASSAGE + " " + PASSAGE)])
    assert ids.shape[1] > PREFILL_ROWS
    layers = [m for m in gguf_packed.modules() if isinstance(m, QuantizedLinear) and m.kernel == "packed"]
    assert layers, "the embedded GGUF runs on the packed kernel on every machine this suite knows"
    results = {}
    try:
        for prefill in (False, True):
            for m in layers:
                m.prefill_bf16 = prefill
            with torch.inference_mode():
                logits = gguf_packed(ids)
            results[prefill] = (logits[0, -1], _perplexity(gguf_packed, ids))
    finally:
        for m in layers:
            m.prepare(m.kernel)
    (packed_last, packed_ppl), (bf16_last, bf16_ppl) = results[False], results[True]
    assert abs(bf16_ppl / packed_ppl - 1) < 0.01
    assert bf16_last.argmax() == packed_last.argmax()
    assert (bf16_last - packed_last).abs().max() < 0.03 * packed_last.abs().max()


def test_int4_model_compiled_decodes_as_eager(tiny):
    """``compile=True`` (about 9 s here: the one compiled test of this file)."""
    model, tok = tiny
    q = quantize_model(copy.deepcopy(model), "int4", 32, kernel="packed")
    eager = generate(q, tok, "Once upon a time", max_new_tokens=8)
    assert generate(q, tok, "Once upon a time", max_new_tokens=8, compile=True) == eager


def test_load_model_quantizes_a_folder(tiny, tiny_folder):
    model, tok = tiny
    q, _ = load_model(tiny_folder, quantize="int4", group_size=32, device="cpu", progress=False)
    assert q.quantization == "int4/g32" and isinstance(q.lm_head, QuantizedLinear)
    assert torch.equal(q.layers[0].mlp.up_proj.dequantize(),
                       QuantizedLinear.from_float(model.layers[0].mlp.up_proj.weight, None, "int4", 32).dequantize())
    ids = torch.tensor([tok.encode("Once upon a time")])
    with torch.inference_mode():
        assert torch.equal(q.embed_tokens(ids), q.lm_head.dequantize()[ids])  # the tied embedding reads the head


def test_cli_refuses_a_bad_group_size_with_one_line(capsys, tiny_folder):
    from infllm_lite.cli import main

    code = main(["generate", "--model", str(tiny_folder), "--prompt", "Hi", "--quantize", "int4", "--group-size", "48"])
    err = capsys.readouterr().err
    assert code == 1 and err == "error: int4 group size 48: choose one of 32, 64, 128\n"


def test_a_snapshot_records_the_quantization_and_refuses_another(tiny, tmp_path):
    from infllm_lite.attention import make_attention_state
    from infllm_lite.memory_config import MemoryConfig
    from infllm_lite.snapshot import load_snapshot, save_snapshot
    model, _ = tiny
    cfg = MemoryConfig(n_init=4, n_local=32, block_size=8, topk=2, repr_topk=2, exc_block_size=16, max_cached_blocks=4)
    int8 = quantize_model(copy.deepcopy(model), "int8", None, kernel="dequant")
    int4 = quantize_model(copy.deepcopy(model), "int4", 32, kernel="dequant")
    state = make_attention_state("infllm", model.args, capacity=1, memory=cfg, kernel="window-eager")
    with torch.inference_mode():
        int8(torch.randint(3, 1000, (1, 60)), state)
    save_snapshot(tmp_path / "q.snap", state, model=int8, mode="infllm", memory=cfg, tokens=list(range(60)))
    assert load_snapshot(tmp_path / "q.snap", int8, kernel="window-eager").state.length == 60
    for other, what in ((int4, "int4/g32 weights"), (model, "float weights")):
        with pytest.raises(InfLLMLiteError, match=f"saved from this checkpoint with int8 weights; this model has {what}"):
            load_snapshot(tmp_path / "q.snap", other, kernel="window-eager")
