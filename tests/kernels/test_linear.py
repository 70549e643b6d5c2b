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
