"""Replaces `layers.linear` (x @ W^T) on the CPU in fp32 with oneDNN's GEMM, the kernel inductor uses for CPU
linears, for the forward and for dX = dY W; dW = dY^T X stays torch's matmul.

`kernels.layers_linear` (kernels/__init__.py) takes it for fp32 CPU tensors without bias, outside autocast and
torch.compile, with at least `MIN_ROWS` rows (`use_onednn`). `AVAILABLE` is False on torch builds without oneDNN.
Inference on 1 to `FEW_ROWS` rows (a decoding step of a few positions) reads the weight once for all rows: eagerly
as W x^T (`few_rows`, a BLAS call that streams the weight, where x W^T of so few rows does not), under torch.compile
as one multiply-reduce per row (`rows_inner`: inductor fuses them into one loop that reads each row of W once, for
every row of x). `python benchmarks/mtp.py --curves 174m` times both against x W^T.
"""

from __future__ import annotations

import torch

AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
MIN_ROWS = 16  # fewer rows: torch's own matmul
FEW_ROWS = 8  # inference on at most this many rows: `rows_inner` compiled, `few_rows` eagerly (0: neither)


def onednn_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T in strict fp32 by oneDNN. Either operand may be a transposed view."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def use_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x @ w^T takes `onednn_mm`: fp32 on the CPU, eager, outside autocast, enough rows, and oneDNN
    not switched off (torch.backends.mkldnn.flags(enabled=False))."""
    return (AVAILABLE and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
            and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and x.numel() >= MIN_ROWS * x.shape[-1])


class OneDNNLinear(torch.autograd.Function):
    """x @ W^T with oneDNN's GEMM for the forward and for dX = dY W; dW = dY^T X by torch's matmul."""

    @staticmethod
    def forward(ctx, x, w):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, w)
        return onednn_mm(x2, w).view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = onednn_mm(dy2, w.t()).view(*dy.shape[:-1], w.shape[1]) if ctx.needs_input_grad[0] else None
        return dx, (dy2.t() @ x2 if ctx.needs_input_grad[1] else None)


def few_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x W^T computed as (W x^T)^T, for a handful of rows x (..., K) on the CPU."""
    return (w @ x.reshape(-1, x.shape[-1]).t()).t().reshape(*x.shape[:-1], w.shape[0])


def rows_inner(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x W^T for a handful of rows x (..., K) as one multiply-reduce sum_k W[n, k] x[t, k] per row t, which
    inductor fuses into one loop over n that reads W[n] once for all rows (torch.compile only: eagerly each row
    builds an (N, K) product)."""
    x2 = x.reshape(-1, x.shape[-1])
    return torch.stack([(w * r).sum(-1) for r in x2]).reshape(*x.shape[:-1], w.shape[0])


def for_few_rows(x: torch.Tensor, w: torch.Tensor):
    """The product that reads w once for all rows of x when x W^T is CPU inference on 1 to FEW_ROWS rows (a
    decoding step): `rows_inner` under torch.compile, `few_rows` eagerly from 2 rows; else None."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or torch.is_grad_enabled() or rows > FEW_ROWS:
        return None
    if torch.compiler.is_compiling():
        return rows_inner
    return few_rows if rows >= 2 else None
