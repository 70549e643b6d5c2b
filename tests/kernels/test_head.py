"""kernels/head.py against the reference `model.head_loss` (logits, then F.cross_entropy): the fused chunked head
+ cross-entropy in every layout, its kept buffers, and the tied embedding's gradient."""

import pytest
import torch
import torch.nn.functional as F
from conftest import small_cfg

import dsv3
import dsv3.kernels.head as head_mod
from dsv3.kernels import buffers


def grads(m):
    return [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("vocab", [512, 500])  # 500: padded to 512 (accelerators: the vocabulary; CPU: the rows)
@pytest.mark.parametrize("inplace", [True, False])  # False: the accelerator branch (fresh tensors), run on CPU
@pytest.mark.parametrize("chunk", [1024, 7])  # one chunk, and many chunks with a ragged last one
def test_fused_cross_entropy_equals_plain_loss_and_grads(chunk, inplace, vocab, monkeypatch):
    monkeypatch.setattr(head_mod, "CE_CHUNK", chunk)
    monkeypatch.setattr(head_mod, "CE_CHUNK_ELEMS", 0)
    monkeypatch.setattr(head_mod, "CE_CHUNK_ACCEL", chunk)
    monkeypatch.setattr(head_mod, "INPLACE_CE_DEVICES", ("cpu",) if inplace else ())
    monkeypatch.setattr(head_mod, "CE_LOGITS_BLOCK", 96)  # the CPU's oneDNN logits in 6 blocks, the last ragged
    torch.manual_seed(0)
    m = dsv3.DeepSeekV3(small_cfg(vocab_size=vocab)).train()
    x, y = torch.randint(0, vocab, (3, 17)), torch.randint(0, vocab, (3, 17))
    y[0, :5] = -100  # ignored positions (padding)
    ref = m(x, y)
    ref.loss.backward()
    g_ref = grads(m)
    m.zero_grad()
    out = m(x, y, return_logits=False)
    out.loss.backward()
    assert out.logits is None and ref.logits.shape == (3, 17, vocab)
    assert out.ce_loss.item() == pytest.approx(ref.ce_loss.item(), rel=1e-6)
    for a, b in zip(grads(m), g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("inplace", [True, False])  # False: the accelerator branch (fresh tensors), run on CPU
def test_fused_cross_entropy_bf16_and_no_grad(inplace, monkeypatch):
    monkeypatch.setattr(head_mod, "INPLACE_CE_DEVICES", ("cpu",) if inplace else ())
    monkeypatch.setattr(head_mod, "CE_CHUNK", 7)
    monkeypatch.setattr(head_mod, "CE_CHUNK_ELEMS", 0)
    monkeypatch.setattr(head_mod, "CE_CHUNK_ACCEL", 7)
    torch.manual_seed(0)
    m = dsv3.DeepSeekV3(small_cfg(vocab_size=500)).train()  # not a multiple of 64: a padded vocabulary
    x, y = torch.randint(0, 500, (2, 16)), torch.randint(0, 500, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = m(x, y), m(x, y, return_logits=False)
    ref.loss.backward()
    g_ref = grads(m)
    m.zero_grad()
    out.loss.backward()
    assert out.ce_loss.dtype == torch.float32 and abs(out.ce_loss.item() - ref.ce_loss.item()) < 1e-3
    assert m.embed.weight.grad.dtype == torch.float32 and m.embed.weight.grad.abs().sum() > 0
    for a, b in zip(grads(m), g_ref, strict=True):  # autocast's plain path, to bf16 precision
        assert (a - b).norm() <= 2e-2 * b.norm() + 1e-6
    with torch.no_grad():  # evaluation: the loss alone
        assert m(x, y, return_logits=False).ce_loss.item() == pytest.approx(m(x, y).ce_loss.item(), rel=1e-6)


@pytest.mark.parametrize("inplace", [True, False])
def test_fused_cross_entropy_of_unlikely_targets(inplace, monkeypatch):
    """Targets with a probability below fp32's range (CE of hundreds of nats) get the exact loss on both paths
    (the CPU path takes -log of the softmax and recomputes such rows), and the gradients stay those of the plain
    loss; chunks of 3 rows put one such row in a chunk with ordinary ones."""
    monkeypatch.setattr(head_mod, "INPLACE_CE_DEVICES", ("cpu",) if inplace else ())
    monkeypatch.setattr(head_mod, "CE_CHUNK", 3)
    monkeypatch.setattr(head_mod, "CE_CHUNK_ELEMS", 0)
    monkeypatch.setattr(head_mod, "CE_CHUNK_ACCEL", 3)
    torch.manual_seed(0)
    h = torch.randn(7, 16)
    w = torch.randn(64, 16)
    t = torch.randint(0, 64, (7,))
    h[1] *= 40  # logits spread over hundreds: one row's target far below the top
    t[1] = (h[1] @ w.t()).argmin()
    h, w = h.requires_grad_(), w.requires_grad_()
    ref = F.cross_entropy(h @ w.t(), t)
    assert (F.cross_entropy(h @ w.t(), t, reduction="none")[1] > 150).item()  # p_target underflows fp32
    out = head_mod.linear_cross_entropy(h, w, t)
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    g_out, g_ref = torch.autograd.grad(out, (h, w)), torch.autograd.grad(ref, (h, w))
    for a, b in zip(g_out, g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_fused_cross_entropy_second_backward_fails_loudly():
    """backward scales the saved gradients in place; a second backward must raise, never return wrong grads."""
    h, w = torch.randn(8, 4, requires_grad=True), torch.randn(10, 4, requires_grad=True)
    loss = head_mod.linear_cross_entropy(h, w, torch.randint(0, 10, (8,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_tied_embedding_gradient_accumulates_and_falls_back_without_the_head():
    """The fused path adds the embedding's gradient into the head's dW (TiedEmbedding): gradients accumulated over
    two micro-batches equal the plain path's, and a loss that does not go through the head (the router losses
    alone) still gets the embedding's dense gradient."""
    torch.manual_seed(0)
    m = dsv3.DeepSeekV3(small_cfg()).train()
    assert m.head.weight is m.embed.weight
    batches = [(torch.randint(0, 512, (2, 9)), torch.randint(0, 512, (2, 9))) for _ in range(2)]
    for fused in (False, True):
        m.zero_grad(set_to_none=True)
        for x, y in batches:
            m(x, y, return_logits=not fused).loss.backward()
        if not fused:
            g_ref = grads(m)
    for a, b in zip(grads(m), g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-4)
    x, y = batches[0]
    for fused in (False, True):
        m.zero_grad(set_to_none=True)
        m(x, y, return_logits=not fused).aux_loss.backward()
        if not fused:
            emb_ref = m.embed.weight.grad.clone()
    assert emb_ref.abs().sum() > 0 and torch.allclose(m.embed.weight.grad, emb_ref, atol=1e-9, rtol=1e-5)


def test_fused_cross_entropy_kept_buffers_never_overwrite_live_gradients():
    """On the CPU the head's dW buffer is kept from step to step: reused once its .grad is dropped (no fresh
    allocation), but a .grad the caller still holds, or the dW saved by a forward whose backward has not run,
    keeps its values when another step runs."""
    torch.manual_seed(0)
    w = torch.randn(64, 16, requires_grad=True)
    steps = [(torch.randn(12, 16), torch.randint(0, 64, (12,))) for _ in range(3)]
    ref = [torch.autograd.grad(F.cross_entropy(h @ w.t(), t), w)[0] for h, t in steps]

    def grad_of(i):
        head_mod.linear_cross_entropy(steps[i][0], w, steps[i][1]).backward()
        g, w.grad = w.grad, None
        return g

    first = grad_of(0)
    ptr = first.data_ptr()
    held = grad_of(1)  # `first` is still alive: a fresh buffer
    assert held.data_ptr() != ptr
    assert torch.allclose(first, ref[0], atol=1e-7, rtol=1e-5) and torch.allclose(held, ref[1], atol=1e-7, rtol=1e-5)
    del first
    ptr = held.data_ptr()
    del held
    assert grad_of(2).data_ptr() == ptr  # nothing held it: the same memory again
    pending = head_mod.linear_cross_entropy(steps[0][0], w, steps[0][1])  # saved dW, backward not yet run
    assert torch.allclose(grad_of(2), ref[2], atol=1e-7, rtol=1e-5)
    pending.backward()
    assert torch.allclose(w.grad, ref[0], atol=1e-7, rtol=1e-5)


def test_workspace_keeps_one_buffer_per_dtype():
    """Alternating fp32 and bf16 calls (as the interleaved benchmark's steps do) each get their own kept buffer
    back, instead of each call replacing the other dtype's; the head's values stay right across the switch."""
    owner = type("Owner", (), {})()  # any weak-referenceable object
    a32 = buffers.workspace(owner, "z", (8, 4), torch.float32)
    a16 = buffers.workspace(owner, "z", (8, 4), torch.bfloat16)
    assert buffers.workspace(owner, "z", (8, 4), torch.float32) is a32  # the kept tensor itself: no allocation
    assert buffers.workspace(owner, "z", (8, 4), torch.bfloat16) is a16
    assert buffers.workspace(owner, "z", (4, 4), torch.float32).shape == (4, 4)  # a new shape: a new buffer

    torch.manual_seed(123)
    w = torch.randn(64, 16, requires_grad=True)
    h, t = torch.randn(12, 16), torch.randint(0, 64, (12,))
    ref = torch.autograd.grad(F.cross_entropy(h @ w.t(), t), w)[0]
    for bf16 in (False, True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            head_mod.linear_cross_entropy(h, w, t).backward()
        assert torch.allclose(w.grad, ref, atol=2e-2 if bf16 else 1e-7, rtol=2e-2 if bf16 else 1e-5)
        w.grad = None
