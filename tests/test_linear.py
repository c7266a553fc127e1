"""``models.linear.Linear``: the CPU decode kernel (oneDNN on a packed weight, or BLAS)
(oneDNN) gives each row the same bits whatever the other rows, stays within float32 rounding of
``F.linear``, follows weight changes, and refuses an unknown override."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from infllm_lite.errors import InfLLMLiteError
from infllm_lite.models import linear
from infllm_lite.models.linear import FEW_ROWS, Linear, cpu_linear_kernel, set_cpu_linear_kernel


@pytest.fixture(params=linear.CPU_LINEAR_KERNELS)
def kernel(request):
    before = cpu_linear_kernel()
    set_cpu_linear_kernel(request.param)
    yield request.param
    set_cpu_linear_kernel(before)


@settings(max_examples=25, deadline=None)
@given(n_in=st.integers(1, 300), n_out=st.integers(1, 300), rows=st.integers(1, FEW_ROWS),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_rows_are_independent_and_match_f_linear(n_in, n_out, rows, bias, seed):
    torch.manual_seed(seed)
    for name in linear.CPU_LINEAR_KERNELS:
        set_cpu_linear_kernel(name)
        layer = Linear(n_in, n_out, bias=bias)
        x = torch.randn(rows, 1, n_in)
        with torch.inference_mode():
            together = layer(x)  # (rows, 1, n_out)
            alone = torch.cat([layer(x[b:b + 1]) for b in range(rows)])
            expected = F.linear(x, layer.weight, layer.bias)
        if name == "onednn":  # what a batched decode step equal to the sequence alone rests on
            assert torch.equal(together, alone)
        torch.testing.assert_close(alone, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together, expected, atol=1e-5, rtol=1e-5)
    set_cpu_linear_kernel(None)


def test_a_changed_weight_is_packed_again(kernel):
    layer = Linear(8, 4, bias=False)
    x = torch.randn(2, 8)
    with torch.inference_mode():
        layer(x)
    with torch.no_grad():
        layer.weight.mul_(2.0)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), atol=1e-6, rtol=1e-6)


def test_gradients_flow_through_f_linear(kernel):
    layer = Linear(8, 4)
    layer(torch.randn(3, 8)).sum().backward()
    assert layer.weight.grad is not None


def test_other_dtypes_keep_the_few_row_product(kernel):
    layer = Linear(16, 8).to(torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = (layer.weight @ x.T).T + layer.bias
        assert torch.equal(layer(x), expected)


def test_an_unknown_kernel_is_refused(monkeypatch):
    with pytest.raises(InfLLMLiteError, match="unknown CPU linear kernel"):
        set_cpu_linear_kernel("fast")
    before = cpu_linear_kernel()
    try:
        set_cpu_linear_kernel(None)
        monkeypatch.setenv("INFLLM_LITE_CPU_LINEAR", "fast")
        with pytest.raises(InfLLMLiteError, match="INFLLM_LITE_CPU_LINEAR='fast'"):
            cpu_linear_kernel()
        monkeypatch.setenv("INFLLM_LITE_CPU_LINEAR", "blas")
        assert cpu_linear_kernel() == "blas"
    finally:
        set_cpu_linear_kernel(before)
