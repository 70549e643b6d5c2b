"""kernels/attention.py against the reference `mla.attention`: CausalAttention (values, gradients, buffer reuse,
bf16 precision) and the padded-V flash path."""

import torch
import torch.nn.functional as F
from conftest import small_cfg

import dsv3
from dsv3 import kernels
from dsv3.kernels import attention as ka
from dsv3.kernels.attention import CausalAttention
from dsv3.layers import apply_rope
from dsv3.mla import attention


def attention_inputs(B, T, H, nope, rope, v, dtype=torch.float32, requires_grad=True):
    """Random q (B, T, H, nope + rope) before RoPE, kv (B, T, H, nope + v), rotated k_pe (B, T, rope), cos, sin."""
    q, kv, k_pe = (torch.randn(*s, dtype=dtype, requires_grad=requires_grad)
                   for s in ((B, T, H, nope + rope), (B, T, H, nope + v), (B, T, rope)))
    angle = torch.randn(T, rope // 2, dtype=dtype)
    return q, kv, k_pe, angle.cos(), angle.sin()


def reference(q, kv, k_pe, cos, sin, scale, nope):
    """The reference `mla.attention`, shaped as CausalAttention's output (B, T, H, v)."""
    B, T, H, _ = q.shape
    return attention.reference(q, kv, k_pe, cos, sin, scale, nope).view(B, T, H, -1)


def sdpa_bf16(q, kv, k_pe, cos, sin, scale, nope):
    """The reference's math with SDPA's inputs rounded to bf16: torch's own bf16 attention, for comparison."""
    B, T, H, _ = q.shape
    q_nope, q_pe = q.transpose(1, 2).split([nope, q.shape[-1] - nope], dim=-1)
    k_nope, v = kv.transpose(1, 2).split([nope, kv.shape[-1] - nope], dim=-1)
    qh = torch.cat([q_nope, apply_rope(q_pe, cos, sin)], dim=-1)
    kh = torch.cat([k_nope, k_pe.unsqueeze(1).expand(B, H, T, -1)], dim=-1)
    ins = [t.to(torch.bfloat16) for t in (qh, kh, v)]
    return F.scaled_dot_product_attention(*ins, is_causal=True, scale=scale).transpose(1, 2)


def test_causal_attention_equals_the_reference_with_gradients():
    torch.manual_seed(0)
    q, kv, k_pe, cos, sin = attention_inputs(2, 7, 3, 5, 4, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: CausalAttention.apply(*a, cos, sin, 0.3, 5), (q, kv, k_pe))
    q, kv, k_pe = (t.detach().float().requires_grad_() for t in (q, kv, k_pe))
    cos, sin = cos.float(), sin.float()
    ref = [t.detach().clone().requires_grad_() for t in (q, kv, k_pe)]
    out = CausalAttention.apply(q, kv, k_pe, cos, sin, 0.3, 5)  # its softmax runs in place in the scores' buffer
    expect = reference(*ref, cos, sin, 0.3, 5)
    g = torch.randn_like(out)
    out.backward(g)
    expect.backward(g)
    assert (out - expect).abs().max() <= 1e-6
    for a, b in zip((q, kv, k_pe), ref, strict=True):
        assert (a.grad - b.grad).abs().max() <= 1e-6
    # its buffers are reused across calls: two graphs of other lengths and batch sizes in between, run back to front
    for a in (q, kv, k_pe):
        a.grad = None
    others = [attention_inputs(b, t, 3, 5, 4, 6) for b, t in ((1, 5), (3, 11))]
    first = CausalAttention.apply(q, kv, k_pe, cos, sin, 0.3, 5)
    outs = [CausalAttention.apply(*o, 0.3, 5) for o in others]
    for o, ins in zip(reversed(outs), reversed(others), strict=True):
        o.sum().backward()
        ref_o = reference(*ins, 0.3, 5)
        for t, expect_grad in zip(ins[:3], torch.autograd.grad(ref_o.sum(), ins[:3]), strict=True):
            assert torch.allclose(t.grad, expect_grad, atol=1e-6)
    first.backward(g)
    for a, b in zip((q, kv, k_pe), ref, strict=True):
        assert (a.grad - b.grad).abs().max() <= 1e-6


def test_causal_attention_bf16_autocast_is_as_precise_as_torch_sdpa_in_bf16():
    # fp32 scores, softmax and dS, bf16 operands elsewhere: output in bf16, gradients in the inputs' fp32, and
    # errors against fp32 about those of torch's own SDPA run on bf16 inputs
    torch.manual_seed(0)
    q, kv, k_pe, cos, sin = attention_inputs(2, 64, 3, 32, 16, 32, requires_grad=False)
    g = torch.randn(2, 64, 3, 32)

    def run(fn):
        ins = [t.clone().requires_grad_() for t in (q, kv, k_pe)]
        out = fn(*ins)
        out.float().backward(g)
        return out, [t.grad for t in ins]

    ref, ref_g = run(lambda *a: reference(*a, cos, sin, 0.3, 32))
    torch16, torch16_g = run(lambda *a: sdpa_bf16(*a, cos, sin, 0.3, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ours_g = run(lambda *a: CausalAttention.apply(*a, cos, sin, 0.3, 32))
    assert ours.dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in ours_g)
    # (scores rounded to bf16 gave 1.5-1.8x torch's errors here; fp32 scores 0.75-1.26x)
    for a, b, r in zip([ours, *ours_g], [torch16, *torch16_g], [ref, *ref_g], strict=True):
        assert (a.float() - r).norm() <= 1.4 * (b.float() - r).norm()


def test_cpu_kernel_and_padded_v_flash_path_equal_the_reference_in_the_model(monkeypatch):
    torch.manual_seed(0)
    m = dsv3.DeepSeekV3(small_cfg()).train()  # qk head 24, v head 16: V is padded on the flash path
    x = torch.randint(0, 512, (2, 20))
    outs = []
    for explicit, on in ((True, True), (False, True), (False, False)):  # CausalAttention, flash, reference
        monkeypatch.setattr(ka, "CPU_MAX_SCORE_BYTES", 64 << 20 if explicit else 0)
        m.zero_grad()
        with kernels.disabled() if not on else torch.enable_grad():
            out = m(x, x)
            out.loss.backward()
        outs.append((out.logits.detach(), m.layers[0].attn.wkv_b.weight.grad.clone()))
    for logits, grad in outs[:2]:
        assert torch.allclose(logits, outs[2][0], atol=1e-5)
        assert torch.allclose(grad, outs[2][1], atol=1e-6, rtol=1e-4)


def test_kernels_take_only_what_they_handle(monkeypatch):
    """A mask (decoding against a cache) or V as wide as Q/K leaves the reference to run."""
    q, kv, k_pe, cos, sin = attention_inputs(1, 4, 2, 4, 4, 8, requires_grad=False)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    assert attention.kernel is kernels.mla_attention
    args = (attention.reference, q, kv, k_pe, cos, sin, 0.3, 4)
    assert kernels.mla_attention(*args, mask) is None
    assert kernels.mla_attention(*args) is not None  # the CPU kernel
    monkeypatch.setattr(ka, "CPU_MAX_SCORE_BYTES", 0)  # past the CPU kernel's budget: flash, if V needs padding
    assert kernels.mla_attention(*args) is None  # v width 8 = q/k width 8: no padding needed
    q, kv, k_pe, cos, sin = attention_inputs(1, 4, 2, 4, 4, 6, requires_grad=False)
    flash = kernels.mla_attention(attention.reference, q, kv, k_pe, cos, sin, 0.3, 4)  # v width 6 < 8: V padded
    assert torch.allclose(flash, attention.reference(q, kv, k_pe, cos, sin, 0.3, 4), atol=1e-6)
