"""layers.py: Linear, RMSNorm, the SwiGLU Expert and RoPE, against their formulas."""

import math
from types import SimpleNamespace

import pytest
import torch

from dsv3 import kernels
from dsv3.layers import Expert, Linear, RMSNorm, apply_rope, linear, rope_cache


def test_linear_is_x_times_w_transposed_with_or_without_kernels():
    torch.manual_seed(0)
    lin = Linear(24, 10, bias=False)
    x = torch.randn(3, 20, 24, dtype=torch.float64).float()
    want = (x.double() @ lin.weight.double().T).float()
    assert torch.allclose(lin(x), want, atol=1e-5)
    with kernels.disabled():
        assert torch.allclose(lin(x), want, atol=1e-5)
    biased = Linear(24, 10)
    assert torch.allclose(biased(x), x @ biased.weight.T + biased.bias, atol=1e-5)
    assert linear.reference(x, lin.weight).shape == (3, 20, 10)
    assert lin.state_dict().keys() == torch.nn.Linear(24, 10, bias=False).state_dict().keys()


def test_rmsnorm_formula_and_dtype():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, 16))
    x = torch.randn(4, 16) * 3
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert torch.allclose(norm(x), want, atol=1e-6)
    assert norm(x.bfloat16()).dtype == torch.bfloat16
    # scale invariance: RMSNorm(c x) = RMSNorm(x) for c > 0 (up to eps)
    assert torch.allclose(norm(100 * x), norm(x), atol=1e-5)


def test_expert_is_swiglu():
    """SwiGLU (Shazeer 2020): FFN(x) = (Swish_1(x W) * x V) W_2, Swish_1(z) = z sigmoid(z), written out elementwise
    in float64 from the paper's formula; and transformers' LlamaMLP (the same FFN as DeepSeek's) with our weights."""
    torch.manual_seed(0)
    e = Expert(8, 12)
    x = torch.randn(5, 8)
    w1, w3, w2 = (lin.weight.double() for lin in (e.w1, e.w3, e.w2))
    a = torch.einsum("td,id->ti", x.double(), w1)  # x W: row t, unit i = sum_d x_td W_id
    swish = a * (1 / (1 + torch.exp(-a)))
    hidden = swish * torch.einsum("td,id->ti", x.double(), w3)
    want = torch.einsum("ti,di->td", hidden, w2)
    assert torch.allclose(e(x).double(), want, atol=1e-5)
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    mlp = llama.LlamaMLP(SimpleNamespace(hidden_size=8, intermediate_size=12, mlp_bias=False, hidden_act="silu"))
    mlp.load_state_dict({"gate_proj.weight": e.w1.weight, "up_proj.weight": e.w3.weight,
                         "down_proj.weight": e.w2.weight})
    assert torch.allclose(e(x), mlp(x), atol=1e-6)


def test_rope_tables_and_rotation():
    cos, sin = rope_cache(8, 16, 10000.0)
    assert cos.shape == sin.shape == (16, 4)
    # position p, pair i: angle p * theta^(-2i/d)
    assert math.isclose(cos[5, 1].item(), math.cos(5 * 10000 ** (-2 / 8)), rel_tol=1e-6)
    x = torch.randn(16, 8)
    y = apply_rope(x, cos, sin)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation keeps lengths
    assert torch.equal(y[0], x[0])  # position 0: the identity
    # pair i rotates (x_i, x_{i+d/2}) by its angle (the half-split layout)
    c, s = cos[3, 2], sin[3, 2]
    assert torch.allclose(y[3, 2], x[3, 2] * c - x[3, 6] * s) and torch.allclose(y[3, 6], x[3, 6] * c + x[3, 2] * s)
    # dot products depend only on the distance between positions
    q, k = torch.randn(8), torch.randn(8)
    d1 = apply_rope(q, cos[9], sin[9]) @ apply_rope(k, cos[4], sin[4])
    d2 = apply_rope(q, cos[6], sin[6]) @ apply_rope(k, cos[1], sin[1])
    assert torch.allclose(d1, d2, atol=1e-5)
