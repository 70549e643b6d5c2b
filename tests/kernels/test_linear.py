"""kernels/linear.py against the reference `layers.linear` (F.linear): oneDNN's fp32 GEMM, forward and dX."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from dsv3 import layers
from dsv3.kernels import linear as kl


@pytest.mark.skipif(not kl.AVAILABLE, reason="this torch build has no oneDNN linear")
def test_onednn_linear_matches_float64_and_runs_only_for_cpu_fp32_without_bias(monkeypatch):
    calls = []
    real = kl.onednn_mm
    monkeypatch.setattr(kl, "onednn_mm", lambda x, w: calls.append(tuple(x.shape)) or real(x, w))
    torch.manual_seed(0)
    lin = layers.Linear(48, 40, bias=False)
    x = torch.randn(3, 20, 96)[..., ::2].requires_grad_()  # a strided (non-contiguous) input
    y = lin(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert calls == [(60, 48), (60, 40)]  # the forward, then dX; dW is torch's matmul
    x64, w64, dy64 = x.detach().double().reshape(60, 48), lin.weight.detach().double(), dy.double().reshape(60, 40)
    for got, ref in ((y, x64 @ w64.T), (x.grad, dy64 @ w64), (lin.weight.grad, dy64.T @ x64)):
        assert torch.allclose(got.double().reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16  # autocast's bf16 linear
    lin(x[:1, :5])  # 5 rows (decoding): torch's matmul
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the flags warn that oneDNN's TF32 is for Intel GPUs
        with torch.backends.mkldnn.flags(enabled=False):
            lin(x)
    biased = layers.Linear(48, 40)
    assert torch.allclose(biased(x), F.linear(x, biased.weight, biased.bias))
    assert calls == []


def test_few_row_products_match_float64_eager_and_compiled():
    """The decoding step's few-row products: `rows_inner` (compiled) and `few_rows` (eager)
    equal x W^T in float64, eagerly and under torch.compile; and the table takes them only for CPU inference."""
    torch.manual_seed(0)
    w = torch.randn(300, 96)
    compiled = torch.compile(layers.linear, fullgraph=True)
    with torch.no_grad():
        for rows in (1, 2, 3, kl.FEW_ROWS):
            x = torch.randn(1, rows, 96)
            want = (x.double() @ w.double().t()).float()
            torch.testing.assert_close(kl.rows_inner(x, w), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(kl.few_rows(x, w), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(compiled(x, w), want, rtol=1e-5, atol=1e-5)
        assert kl.for_few_rows(torch.randn(1, 2, 96), w) is kl.few_rows
        assert kl.for_few_rows(torch.randn(1, 1, 96), w) is None  # eager: torch's matrix-vector product
        assert kl.for_few_rows(torch.randn(1, kl.FEW_ROWS + 1, 96), w) is None
    assert kl.for_few_rows(torch.randn(1, 2, 96), w) is None  # grad on: training keeps the reference


def test_table_takes_rows_inner_for_up_to_few_rows_under_compile(monkeypatch):
    """`kernels.layers_linear` (the table): CPU inference on 1 .. FEW_ROWS rows takes `rows_inner` under
    torch.compile and, from 2 rows, `few_rows` eagerly; more rows, or grad on, neither."""
    import dsv3.kernels as kernels

    took = []
    monkeypatch.setattr(kl, "rows_inner", lambda x, w: took.append("rows_inner") or x @ w.t())
    monkeypatch.setattr(kl, "few_rows", lambda x, w: took.append("few_rows") or x @ w.t())
    monkeypatch.setattr(kl, "FEW_ROWS", 2)
    w = torch.randn(40, 16)
    with torch.no_grad():
        kernels.layers_linear(layers.linear.reference, torch.randn(1, 2, 16), w)  # eager
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        for rows in (1, 2):
            kernels.layers_linear(layers.linear.reference, torch.randn(1, rows, 16), w)
        assert kernels.layers_linear(layers.linear.reference, torch.randn(1, 3, 16), w) is None
    assert kernels.layers_linear(layers.linear.reference, torch.randn(1, 1, 16), w) is None
    assert took == ["few_rows", "rows_inner", "rows_inner"]
