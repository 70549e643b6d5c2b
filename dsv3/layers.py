"""Building blocks shared by attention and feed-forward: `Linear`, `RMSNorm`, the SwiGLU `Expert`, and RoPE.

RoPE here uses the half-split layout (rotate the first half of a vector against its second half, as LLaMA
does); DeepSeek's checkpoints pair adjacent values instead. The two differ only by a fixed permutation of the
rope dimensions, which the Hugging Face export applies to the weights.
Nothing here knows about configs, caches or training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels


@kernels.fast_path(kernels.layers_linear)
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ b): every projection of the model goes through here."""
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose product is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight (Zhang & Sennrich 2019), computed in fp32 for stability under bf16."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class Expert(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): w2(silu(w1 x) * w3 x). The dense MLP and the shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, bias=False)  # gate projection
        self.w3 = Linear(dim, inter_dim, bias=False)  # up projection
        self.w2 = Linear(inter_dim, dim, bias=False)  # down projection (a residual output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_cache(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (Su et al. 2021): cos and sin tables of shape (max_seq_len, head_dim // 2) for positions
    0..max_seq_len-1, frequency i = theta^(-2i / head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(s) + 1 (YaRN eq. 21); 1 when the context is not stretched."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_rope_cache(head_dim: int, max_seq_len: int, theta: float, factor: float, original_max_seq_len: int,
                    beta_fast: float, beta_slow: float, attn_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_cache` with YaRN's frequencies (Peng et al. 2023, "NTK-by-parts"; DeepSeek-V2 §3.1): dims that turn
    more than beta_fast times within the original context keep their frequency, those turning fewer than beta_slow
    times are divided by the factor s, a linear ramp between; cos and sin are scaled by attn_factor, so q_pe . k_pe
    is scaled by its square."""
    d = head_dim
    base = theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)

    def dim_turning(n: float) -> float:  # the dim whose wavelength fits n times into the original context
        return d * math.log(original_max_seq_len / (n * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(dim_turning(beta_fast)), 0), min(math.ceil(dim_turning(beta_slow)), d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low if high != low else 0.001)).clamp(0, 1)
    inv_freq = (1 - ramp) / base + ramp / (factor * base)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return (angles.cos() * attn_factor).float(), (angles.sin() * attn_factor).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, d) by position: cos/sin are (T, d/2) or (B, 1, T, d/2) for per-row positions."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
