"""DeepSeekMoE: router invariants, losses, aux-loss-free bias, dispatch against a per-token reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import small_cfg

import dsv3.moe as moe
from dsv3.moe import MoE, balance_loss, expert_load, router_z_loss


def make_moe(**overrides) -> MoE:
    torch.manual_seed(123)
    m = MoE(small_cfg(**overrides))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return m


def per_token_reference(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """sum_i g_i FFN_i(x) + shared(x), one token at a time (eq. 12)."""
    gates, idx, _, _ = m.gate(x)
    out = m.shared_experts(x).clone()
    e = m.experts
    for t in range(x.shape[0]):
        for g, i in zip(gates[t], idx[t], strict=True):
            out[t] += g * ((F.silu(x[t] @ e.w1[i]) * (x[t] @ e.w3[i])) @ e.w2[i])
    return out


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_router_invariants(score_func):
    m = make_moe(score_func=score_func, route_scale=2.5 if score_func == "sigmoid" else 1.0)
    x = torch.randn(50, 64)
    gates, idx, probs, logits = m.gate(x)
    assert idx.shape == gates.shape == (50, 2)
    assert (idx[:, 0] != idx[:, 1]).all()  # top-k ids are distinct
    assert (gates >= 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(50), atol=1e-6)
    if score_func == "softmax":  # gates are the softmax probabilities themselves (no renormalisation)
        assert torch.allclose(gates, logits.softmax(-1).gather(1, idx))
        assert torch.equal(idx, logits.topk(2).indices)
    else:  # sigmoid gates renormalised over the top-k, times route_scale
        assert torch.allclose(gates.sum(-1), torch.full((50,), 2.5), atol=1e-5)


def test_group_limited_routing_masks_with_minus_inf():
    # sigmoid scores + a large negative bias make every selection score negative; masking dropped
    # groups with 0 instead of -inf would let them win. With -inf, both picks stay in one group.
    m = make_moe(score_func="sigmoid", n_expert_groups=4, n_limited_groups=1)
    m.gate.bias.fill_(-10.0)
    _, idx, _, _ = m.gate(torch.randn(200, 64))
    assert torch.equal(idx[:, 0] // 2, idx[:, 1] // 2)


def test_balance_loss_uniform_and_collapsed():
    n, k, tokens = 8, 2, 64
    uniform_probs = torch.full((tokens, n), 1 / n)
    uniform_idx = torch.arange(tokens * k).view(tokens, k) % n
    assert balance_loss(uniform_probs, expert_load(uniform_idx, n)).item() == pytest.approx(1.0)
    collapsed_probs = torch.zeros(tokens, n)
    collapsed_probs[:, 0] = 1.0
    collapsed_idx = torch.zeros(tokens, 1, dtype=torch.long)
    assert balance_loss(collapsed_probs, expert_load(collapsed_idx, n)).item() == pytest.approx(n)
    # the model-level value is alpha * mean over layers: alpha for uniform routing
    cfg = small_cfg(aux_loss_coef=0.01)
    m = dsv3_model(cfg)
    for layer in m.moe_layers():
        torch.nn.init.zeros_(layer.gate.weight)  # all probabilities 1/N
    tokens_ = torch.randint(0, cfg.vocab_size, (4, 32))
    # zero logits -> ties -> topk picks the same 2 experts: not uniform f, so check against the formula
    out = m(tokens_, tokens_)
    f = m.moe_layers()[0].last_load / m.moe_layers()[0].last_load.sum()
    assert out.aux_loss.item() == pytest.approx(0.01 * 8 * (f * (1 / 8)).sum().item(), rel=1e-5)
    assert out.aux_loss.item() == pytest.approx(0.01, rel=1e-5)  # sum_i f_i = 1, P_i = 1/N -> alpha


def dsv3_model(cfg):
    import dsv3

    torch.manual_seed(123)
    return dsv3.DeepSeekV3(cfg)


def test_z_loss_on_known_logits():
    logits = torch.zeros(5, 8)
    assert router_z_loss(logits).item() == pytest.approx(math.log(8) ** 2)
    logits = torch.tensor([[0.0, math.log(3.0)]])  # logsumexp = log 4
    assert router_z_loss(logits).item() == pytest.approx(math.log(4.0) ** 2)


def test_bias_update_balances_load_without_touching_gates():
    m = make_moe(score_func="sigmoid", bias_update_speed=0.05)
    m.train()
    x = torch.randn(512, 64) + 0.5  # a shifted input: routing starts unbalanced
    with torch.no_grad():
        gates0, idx0, probs0, _ = m.gate(x)
        m(x.unsqueeze(0))
    load0 = m.last_load.clone()
    assert torch.equal(m.gate.step_load, load0)
    spread0 = (load0.max() / load0.mean()).item()
    for _ in range(40):
        m.gate.update_bias()
        with torch.no_grad():
            m(x.unsqueeze(0))
    spread = (m.last_load.max() / m.last_load.mean()).item()
    assert spread < spread0 and spread < 1.3, (spread0, spread)
    # gates still come from the unbiased scores: renormalised sigmoid of the logits
    gates, idx, _, logits = m.gate(x)
    expected = logits.sigmoid().gather(1, idx)
    assert torch.allclose(gates, expected / expected.sum(-1, keepdim=True))
    assert not torch.equal(idx, idx0)  # ...while the selection did move
    assert "gate.bias" in m.state_dict() and not m.gate.bias.requires_grad


@pytest.mark.parametrize("grouped", [True, False])
def test_dispatch_equals_per_token_reference(grouped, monkeypatch):
    monkeypatch.setattr(moe, "_HAS_GROUPED_MM", grouped and moe._HAS_GROUPED_MM)
    m = make_moe()
    x = torch.randn(3, 7, 64, requires_grad=True)
    y, _, _ = m(x)
    ref = per_token_reference(m, x.view(-1, 64)).view(3, 7, 64)
    assert torch.allclose(y, ref, atol=1e-4)
    w = torch.randn(3, 7, 64)  # gradients through the dispatch (gather, expert matmuls, scatter) too
    gx, gw1 = torch.autograd.grad((y * w).sum(), (x, m.experts.w1))
    rx, rw1 = torch.autograd.grad((ref * w).sum(), (x, m.experts.w1))
    assert torch.allclose(gx, rx, atol=1e-4) and torch.allclose(gw1, rw1, atol=1e-4)
    _, idx, _, _ = m.gate(x.view(-1, 64))
    assert torch.equal(m.last_load, torch.bincount(idx.flatten(), minlength=8).float())


def _expert_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    n, d, i = 6, 16, 12
    load = torch.tensor([5.0, 0.0, 9.0, 1.0, 0.0, 7.0])  # empty experts and a one-row one
    xs = torch.randn(int(load.sum()), d, generator=g, requires_grad=True)
    ws = [(torch.randn(*shape, generator=g) * 0.3).requires_grad_() for shape in ((n, d, i), (n, i, d), (n, d, i))]
    gates = torch.rand(xs.shape[0], 1, generator=g, requires_grad=True)
    return xs, ws, gates, load


@pytest.mark.skipif(not moe._HAS_GROUPED_MM, reason="needs F.grouped_mm")
def test_kept_grad_expert_backward_equals_grouped_mm_autograd():
    """The fp32 CPU training path's hand-written backward (weight gradients in kept buffers) gives grouped_mm's
    autograd outputs and gradients for every input, empty experts included (their gradient slices are zero)."""
    out = {}
    for fn in (moe._grouped_swiglu, moe._kept_grad_swiglu):
        xs, (w1, w2, w3), gates, load = _expert_inputs()
        y = fn(xs, w1, w2, w3, load, gates)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        out[fn] = [y.detach()] + [t.grad for t in (xs, w1, w2, w3, gates)]
    for a, b in zip(out[moe._kept_grad_swiglu], out[moe._grouped_swiglu], strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    for w in out[moe._kept_grad_swiglu][2:5]:
        assert w[[1, 4]].abs().max() == 0 and w[[0, 2, 3, 5]].abs().amin(dim=(1, 2)).min() > 0


@pytest.mark.skipif(not moe._HAS_GROUPED_MM, reason="needs F.grouped_mm")
def test_kept_grad_expert_buffers_never_overwrite_live_gradients():
    """A weight gradient still held (a .grad kept by the caller, or accumulating over two backwards) keeps its values
    when the next backward runs; once dropped, its memory is used again."""
    xs, (w1, w2, w3), gates, load = _expert_inputs()
    xs2 = torch.randn(xs.shape, generator=torch.Generator().manual_seed(2))

    def grad_w2(x):
        moe._kept_grad_swiglu(x, w1, w2, w3, load, gates).square().sum().backward()
        g, w2.grad = w2.grad, None
        return g

    ref = [torch.autograd.grad(moe._grouped_swiglu(x, w1, w2, w3, load, gates).square().sum(), w2)[0]
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
        moe._kept_grad_swiglu(x, w1, w2, w3, load, gates).square().sum().backward()
    assert torch.allclose(w2.grad, ref[0] + ref[1], atol=1e-5)


@pytest.mark.skipif(not moe._HAS_GROUPED_MM, reason="needs F.grouped_mm")
def test_cpu_bf16_padded_dispatch(monkeypatch):
    """bf16 training on CPU pads each expert's rows to a multiple of CPU_BF16_ROWS: the padding rows must not
    change any output or gradient (compared with no padding, and with the fp32 per-token reference)."""
    m = make_moe()
    x = torch.randn(37, 64)  # 74 routed slots over 8 experts: no count is a multiple of 16
    ref = per_token_reference(m, x)
    runs = []
    for rows in (16, 1):
        monkeypatch.setattr(moe, "CPU_BF16_ROWS", rows)
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
    assert torch.allclose(y_inf.view(-1, 64), per_token_reference(m, x.view(-1, 64)), atol=1e-4)


def test_gathered_experts_equal_the_dispatch():
    """RoutedExperts.gathered (compiled decoding: experts read by index, no sort or host sync) = the dispatch."""
    m = make_moe()
    x = torch.randn(5, 64)
    with torch.no_grad():
        gates, idx, _, _ = m.gate(x)
        ref = m.experts(x, idx, gates, expert_load(idx, 8))
        assert torch.allclose(m.experts.gathered(x, idx, gates), ref, atol=1e-5)
        y, _, _ = m(x.unsqueeze(0), losses=False, gathered=True)
    assert torch.allclose(y.squeeze(0), per_token_reference(m, x), atol=1e-4)


def test_gradients_reach_exactly_the_used_experts():
    m = make_moe()
    x = torch.randn(6, 64)
    _, idx, _, _ = m.gate(x)
    y, balance, z = m(x.unsqueeze(0))
    (y.square().sum() + balance + z).backward()
    used = set(idx.flatten().tolist())
    for e in range(8):
        g = m.experts.w1.grad[e].abs().sum().item()
        assert (g > 0) == (e in used), (e, used)
    assert m.gate.weight.grad.abs().sum() > 0 and m.shared_experts.w1.weight.grad.abs().sum() > 0


def test_trace_records_topk_ids_and_gates():
    m = make_moe()
    m.trace = True
    x = torch.randn(2, 5, 64)
    m(x)
    ids, gates = m.last_topk
    g_ref, i_ref, _, _ = m.gate(x.view(-1, 64))
    assert ids.shape == gates.shape == (2, 5, 2)
    assert torch.equal(ids.view(-1, 2), i_ref) and torch.allclose(gates.view(-1, 2), g_ref)


def test_kept_grad_cast_gives_the_cast_gradient_in_a_kept_buffer_never_a_live_one():
    """KeptGradCast (the CPU's bf16 expert weights): the gradient of w.to(bf16) in w's fp32, as autograd's own cast
    gives; written into w's kept buffer when nothing holds it, a fresh one while a .grad is alive, summed over two
    backwards."""
    from dsv3.layers import KeptGradCast

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
