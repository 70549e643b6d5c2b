"""kernels/experts.py against the reference `moe.routed_experts` (one expert at a time): the sorted dispatch in
every variant (grouped_mm, kept-gradient fp32 backward, padded bf16, looped inference, gathered decoding), and
KeptGradCast."""

import pytest
import torch
from conftest import make_moe

from dsv3 import kernels
from dsv3.kernels import experts as ke
from dsv3.kernels.buffers import KeptGradCast
from dsv3.moe import MoE, routed_experts


def reference(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE's output with the kernels off: shared experts + the reference routed loop (eq. 12)."""
    with kernels.disabled():
        return m(x.unsqueeze(0))[0].squeeze(0)


@pytest.mark.parametrize("grouped", [True, False])
def test_dispatch_equals_the_reference_values_and_gradients(grouped, monkeypatch):
    monkeypatch.setattr(ke, "_HAS_GROUPED_MM", grouped and ke._HAS_GROUPED_MM)
    m = make_moe()
    x = torch.randn(3, 7, 64, requires_grad=True)
    y, _, _ = m(x)
    ref = reference(m, x.view(-1, 64)).view(3, 7, 64)
    assert torch.allclose(y, ref, atol=1e-5)
    w = torch.randn(3, 7, 64)  # gradients through the dispatch (gather, expert matmuls, scatter) too
    params = (x, m.experts.w1, m.experts.w2, m.experts.w3, m.gate.weight)
    got = torch.autograd.grad((y * w).sum(), params)
    want = torch.autograd.grad((ref * w).sum(), params)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert routed_experts.kernel is kernels.moe_routed_experts  # the table's entry for the reference


def _expert_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    n, d, i = 6, 16, 12
    load = torch.tensor([5.0, 0.0, 9.0, 1.0, 0.0, 7.0])  # empty experts and a one-row one
    xs = torch.randn(int(load.sum()), d, generator=g, requires_grad=True)
    ws = [(torch.randn(*shape, generator=g) * 0.3).requires_grad_() for shape in ((n, d, i), (n, i, d), (n, d, i))]
    gates = torch.rand(xs.shape[0], 1, generator=g, requires_grad=True)
    return xs, ws, gates, load


@pytest.mark.skipif(not ke._HAS_GROUPED_MM, reason="needs F.grouped_mm")
def test_kept_grad_expert_backward_equals_grouped_mm_autograd():
    """The fp32 CPU training path's hand-written backward (weight gradients in kept buffers) gives grouped_mm's
    autograd outputs and gradients for every input, empty experts included (their gradient slices are zero)."""
    out = {}
    for fn in (ke._grouped_swiglu, ke._kept_grad_swiglu):
        xs, (w1, w2, w3), gates, load = _expert_inputs()
        y = fn(xs, w1, w2, w3, load, gates)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        out[fn] = [y.detach()] + [t.grad for t in (xs, w1, w2, w3, gates)]
    for a, b in zip(out[ke._kept_grad_swiglu], out[ke._grouped_swiglu], strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    for w in out[ke._kept_grad_swiglu][2:5]:
        assert w[[1, 4]].abs().max() == 0 and w[[0, 2, 3, 5]].abs().amin(dim=(1, 2)).min() > 0


@pytest.mark.skipif(not ke._HAS_GROUPED_MM, reason="needs F.grouped_mm")
def test_kept_grad_expert_buffers_never_overwrite_live_gradients():
    """A weight gradient still held (a .grad kept by the caller, or accumulating over two backwards) keeps its values
    when the next backward runs; once dropped, its memory is used again."""
    xs, (w1, w2, w3), gates, load = _expert_inputs()
    xs2 = torch.randn(xs.shape, generator=torch.Generator().manual_seed(2))

    def grad_w2(x):
        ke._kept_grad_swiglu(x, w1, w2, w3, load, gates).square().sum().backward()
        g, w2.grad = w2.grad, None
        return g

    ref = [torch.autograd.grad(ke._grouped_swiglu(x, w1, w2, w3, load, gates).square().sum(), w2)[0]
           for x in (xs, xs2)]
    first = grad_w2(xs)
    held = grad_w2(xs2)  # `first` is still alive: a fresh buffer
    assert held.data_ptr() != first.data_ptr()
    assert torch.allclose(first, ref[0], atol=1e-5) and torch.allclose(held, ref[1], atol=1e-5)
    ptr = held.data_ptr()
    del first, held
    again = grad_w2(xs)
    assert again.data_ptr() == ptr and torch.allclose(again, ref[0], atol=1e-5)  # nothing held it: same memory
    del again
    for x in (xs, xs2):  # two backwards into one .grad: the sum
        ke._kept_grad_swiglu(x, w1, w2, w3, load, gates).square().sum().backward()
    assert torch.allclose(w2.grad, ref[0] + ref[1], atol=1e-5)


@pytest.mark.skipif(not ke._HAS_GROUPED_MM, reason="needs F.grouped_mm")
def test_cpu_bf16_padded_dispatch(monkeypatch):
    """bf16 training on CPU pads each expert's rows to a multiple of CPU_BF16_ROWS: the padding rows must not
    change any output or gradient (compared with no padding, and with the fp32 per-token reference)."""
    m = make_moe()
    x = torch.randn(37, 64)  # 74 routed slots over 8 experts: no count is a multiple of 16
    ref = reference(m, x)
    runs = []
    for rows in (16, 1):
        monkeypatch.setattr(ke, "CPU_BF16_ROWS", rows)
        m.zero_grad()
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _, _ = m(xg.unsqueeze(0))
        (y.float() * torch.linspace(-1, 1, 64)).sum().backward()
        runs.append((y.float().squeeze(0), xg.grad, m.experts.w1.grad.clone(), m.experts.w2.grad.clone()))
    assert m.last_load.remainder(16).ne(0).all()
    assert torch.allclose(runs[0][0], ref, atol=0.05 * ref.abs().max().item())  # bf16 vs fp32
    for a, b in zip(runs[0], runs[1], strict=True):
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-2 * b.abs().max().item())


@pytest.mark.parametrize("tokens", [1, 21])
def test_inference_dispatch_equals_training_dispatch(tokens):
    """Without grad on CPU only the experts that received rows run (decoding one token: 2 of 8); same output."""
    m = make_moe()
    x = torch.randn(1, tokens, 64)
    y_train, _, _ = m(x)
    with torch.no_grad():
        y_inf, _, _ = m(x, losses=False)
    if tokens == 1:
        assert int((m.last_load == 0).sum()) == 6  # top-2 of 8: six experts are skipped
    assert torch.allclose(y_inf, y_train, atol=1e-5)
    assert torch.allclose(y_inf.view(-1, 64), reference(m, x.view(-1, 64)), atol=1e-4)


def test_gathered_experts_equal_the_dispatch():
    """`gathered` (compiled decoding: experts read by index, no sort or host sync) = the dispatch = the reference."""
    m = make_moe()
    x = torch.randn(5, 64)
    with torch.no_grad():
        gates, idx, _, _ = m.gate(x)
        ref = m.experts(x, idx, gates)
        assert torch.allclose(ke.gathered(m.experts, x, idx, gates), ref, atol=1e-5)
        with kernels.disabled():
            assert torch.allclose(ke.gathered(m.experts, x, idx, gates), m.experts(x, idx, gates), atol=1e-5)


def test_kept_grad_cast_gives_the_cast_gradient_in_a_kept_buffer_never_a_live_one():
    """KeptGradCast (the CPU's bf16 expert weights): the gradient of w.to(bf16) in w's fp32, as autograd's own cast
    gives; written into w's kept buffer when nothing holds it, a fresh one while a .grad is alive, summed over two
    backwards."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 8, 5, generator=g, requires_grad=True)
    xs = [torch.randn(4, 3, 8, generator=g).bfloat16() for _ in range(2)]

    def loss(x, cast):
        return (x.transpose(0, 1) @ cast(w)).float().sin().sum()

    ref = [torch.autograd.grad(loss(x, lambda t: t.to(torch.bfloat16)), w)[0] for x in xs]
    assert ref[0].dtype == torch.float32 and not torch.equal(ref[0], ref[1])
    grads = []
    for x in xs:
        loss(x, lambda t: KeptGradCast.apply(t, torch.bfloat16)).backward()
        grads.append(w.grad)
        w.grad = None
    assert all(torch.equal(a, b) for a, b in zip(grads, ref, strict=True))
    assert grads[0].data_ptr() != grads[1].data_ptr()  # the first was still held
    ptr = grads[1].data_ptr()
    del grads
    loss(xs[0], lambda t: KeptGradCast.apply(t, torch.bfloat16)).backward()
    assert w.grad.data_ptr() == ptr and torch.equal(w.grad, ref[0])  # nothing held it: the same memory again
    loss(xs[1], lambda t: KeptGradCast.apply(t, torch.bfloat16)).backward()  # into the live .grad: the sum
    assert torch.allclose(w.grad, ref[0] + ref[1], atol=1e-6)
