"""Building blocks shared by attention and feed-forward: `Linear` (nn.Linear whose CPU fp32 products run on
oneDNN), RMSNorm, the SwiGLU `Expert`, RoPE, and `workspace` (buffers kept from call to call for the
hand-written CPU kernels of attention, the fused head and the experts' backward) with `KeptGradCast` (a weight
cast whose gradient lands in such a buffer).

RoPE uses the half-split layout (rotate the first half of a vector against its second half, as
LLaMA does); DeepSeek's reference code pairs adjacent values instead. The two differ only by a fixed
permutation of the rope dimensions, which the Hugging Face export applies to the weights.
Nothing here knows about configs, caches or training.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

_WORKSPACE = threading.local()  # per thread: owner -> {name: buffer}, freed with the owner


def workspace(owner, name, shape, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised buffer kept for `owner` (any object: a weight, a class) from call to call, per thread.
    A fresh 5-200 MB tensor per call costs a page fault per 4 KB on the CPU: glibc hands freed blocks this large
    back to the kernel. The kept one is handed out again only when nothing else holds its storage (a dW still
    alive as a .grad, or saved for a backward still to run); otherwise a fresh one is made, and kept instead.
    One buffer per name and dtype: steps that alternate fp32 and bf16 (the interleaved benchmark) each find their
    own instead of replacing the other's (which had cost the tiny fp32 step ~100 MB of page faults each time)."""
    if not hasattr(_WORKSPACE, "by_owner"):
        _WORKSPACE.by_owner = WeakIdKeyDictionary()
    bufs = _WORKSPACE.by_owner.setdefault(owner, {})
    t = bufs.get((name, dtype))
    # a buffer made under torch.inference_mode cannot be written outside it (generate(), then a no_grad forward);
    # two references: the kept tensor and the temporary storage object made for the count
    if (t is None or t.shape != shape or t.device != torch.device(device)
            or (t.is_inference() and not torch.is_inference_mode_enabled())
            or torch._C._storage_Use_Count(t.untyped_storage()._cdata) > 2):
        t = bufs[name, dtype] = torch.empty(shape, dtype=dtype, device=device)
    return t


class KeptGradCast(torch.autograd.Function):
    """w.to(dtype) whose backward writes w's gradient, in w's dtype, into a buffer kept for w (`workspace`) rather
    than a fresh tensor: the CPU's bf16 expert dispatch casts the experts' stacked fp32 weights, and the fresh
    3.4 MB fp32 gradients of the cast (ToCopyBackward) took ~1.9 ms each, ~170 ms of a 174m bf16 step, mostly in
    page faults on a 2-core VM. `apply(w, dtype)` with dtype != w.dtype."""

    @staticmethod
    def forward(ctx, w, dtype):
        ctx.w = w  # the buffer's owner (a parameter: no reference cycle through the graph)
        return w.to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        w = ctx.w
        # a fresh view of the kept buffer, as for the fused head's dW: autograd takes it as w.grad without a copy
        return workspace(w, "dw", w.shape, w.dtype, w.device).view(w.shape).copy_(grad), None


# oneDNN's fp32 GEMM (the kernel inductor uses for CPU linears); absent from torch builds without mkldnn
ONEDNN_FP32 = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN_MIN_ROWS = 16  # fewer rows (one-token decoding): torch's own matmul


def onednn_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T in fp32 by oneDNN (strict fp32: no reduced-precision math unless
    torch.backends.mkldnn's fp32_precision is changed). Either operand may be a transposed view."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def use_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x @ w^T takes `onednn_mm`: fp32 on the CPU, eager, outside autocast, enough rows, and oneDNN
    not switched off (torch.backends.mkldnn.flags(enabled=False))."""
    return (ONEDNN_FP32 and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
            and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and x.numel() >= ONEDNN_MIN_ROWS * x.shape[-1])


class OneDNNLinear(torch.autograd.Function):
    """x @ W^T with oneDNN's GEMM for the forward and for dX = dY W; dW = dY^T X stays torch's (MKL's) matmul,
    as fast or faster there. On a 2-core AMD EPYC (Zen 4), MKL 2024 ran the forward's x @ W^T at 105-145
    GFLOP/s on the 174m's linear shapes where oneDNN ran 150-170 (throwaway interleaved timings), and in a
    throwaway same-process A/B the 174m fp32 training step took 3.76 s instead of 4.11 (tiny: 0.453 vs 0.462).
    Not measured on an Intel CPU; `ONEDNN_FP32 = False` turns it off."""

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


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose CPU fp32 products without bias run on oneDNN
    (`OneDNNLinear`); everything else (bias, bf16 autocast, CUDA, torch.compile, a few rows) is F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None and use_onednn(x, self.weight):
            return OneDNNLinear.apply(x, self.weight)
        return super().forward(x)


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in fp32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class Expert(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). The dense MLP and each shared expert."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, bias=False)  # gate projection
        self.w3 = Linear(dim, inter_dim, bias=False)  # up projection
        self.w2 = Linear(inter_dim, dim, bias=False)  # down projection (a residual output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_cache(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, head_dim // 2) for positions 0..max_seq_len-1."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, d) by position: cos/sin are (T, d/2) or (B, 1, T, d/2) for per-row positions."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def rope_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False):
    """`apply_rope`'s rotation written into `out` (any strides, e.g. a view of a gradient), in out's dtype, for
    the CPU attention kernel (no temporaries); inverse=True rotates back, the transpose: a gradient through RoPE."""
    sign = -1.0 if inverse else 1.0
    r2 = x.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :r2], x[..., r2:], out[..., :r2], out[..., r2:]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=sign)
    return out
