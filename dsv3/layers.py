"""Building blocks shared by attention and feed-forward: RMSNorm, the SwiGLU `Expert`, RoPE, and `workspace`
(buffers kept from call to call for the hand-written CPU kernels of attention, the fused head and the
experts' backward) with `KeptGradCast` (a weight cast whose gradient lands in such a buffer).

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
    alive as a .grad, or saved for a backward still to run); otherwise a fresh one is made, and kept instead."""
    if not hasattr(_WORKSPACE, "by_owner"):
        _WORKSPACE.by_owner = WeakIdKeyDictionary()
    bufs = _WORKSPACE.by_owner.setdefault(owner, {})
    t = bufs.get(name)
    # two references: the kept tensor and the temporary storage object made for the count
    if (t is None or t.shape != shape or t.dtype != dtype or t.device != torch.device(device)
            or torch._C._storage_Use_Count(t.untyped_storage()._cdata) > 2):
        t = bufs[name] = torch.empty(shape, dtype=dtype, device=device)
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
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate projection
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up projection
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down projection (a residual output)

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
