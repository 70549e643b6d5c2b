"""Speed options of the model keep its numbers: the fused chunked head + cross-entropy (return_logits=False),
the padded-V flash attention path, and the token check on accelerators."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import small_cfg

import dsv3
import dsv3.layers as layers
import dsv3.model as model_mod


def grads(m):
    return [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("vocab", [512, 500])  # 500: padded to 512 (accelerators: the vocabulary; CPU: the rows)
@pytest.mark.parametrize("inplace", [True, False])  # False: the accelerator branch (fresh tensors), run on CPU
@pytest.mark.parametrize("chunk", [1024, 7])  # one chunk, and many chunks with a ragged last one
def test_fused_cross_entropy_equals_plain_loss_and_grads(chunk, inplace, vocab, monkeypatch):
    monkeypatch.setattr(model_mod, "CE_CHUNK", chunk)
    monkeypatch.setattr(model_mod, "CE_CHUNK_ELEMS", 0)
    monkeypatch.setattr(model_mod, "CE_CHUNK_ACCEL", chunk)
    monkeypatch.setattr(model_mod, "INPLACE_CE_DEVICES", ("cpu",) if inplace else ())
    monkeypatch.setattr(model_mod, "CE_LOGITS_BLOCK", 96)  # the CPU's oneDNN logits in 6 blocks, the last ragged
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


@pytest.mark.skipif(not layers.ONEDNN_FP32, reason="this torch build has no oneDNN linear")
def test_onednn_linear_matches_float64_and_runs_only_for_cpu_fp32_without_bias(monkeypatch):
    calls = []
    real = layers.onednn_mm
    monkeypatch.setattr(layers, "onednn_mm", lambda x, w: calls.append(tuple(x.shape)) or real(x, w))
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


@pytest.mark.parametrize("inplace", [True, False])  # False: the accelerator branch (fresh tensors), run on CPU
def test_fused_cross_entropy_bf16_and_no_grad(inplace, monkeypatch):
    monkeypatch.setattr(model_mod, "INPLACE_CE_DEVICES", ("cpu",) if inplace else ())
    monkeypatch.setattr(model_mod, "CE_CHUNK", 7)
    monkeypatch.setattr(model_mod, "CE_CHUNK_ELEMS", 0)
    monkeypatch.setattr(model_mod, "CE_CHUNK_ACCEL", 7)
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


def test_cpu_explicit_attention_and_padded_v_flash_path_equal_the_math_path(monkeypatch):
    import dsv3.mla as mla

    torch.manual_seed(0)
    m = dsv3.DeepSeekV3(small_cfg()).train()  # qk head 24, v head 16: V is padded on the flash path
    x = torch.randint(0, 512, (2, 20))
    outs = []
    for explicit, pad in ((True, True), (False, True), (False, False)):  # CausalAttention, flash, math
        monkeypatch.setattr(mla, "CPU_EXPLICIT_ATTN_MAX_BYTES", 64 << 20 if explicit else 0)
        monkeypatch.setattr(mla, "PAD_V_FOR_FLASH", pad)
        m.zero_grad()
        out = m(x, x)
        out.loss.backward()
        outs.append((out.logits.detach(), m.layers[0].attn.wkv_b.weight.grad.clone()))
    for logits, grad in outs[:2]:
        assert torch.allclose(logits, outs[2][0], atol=1e-5)
        assert torch.allclose(grad, outs[2][1], atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_compile_blocks_fp32_training_step_matches_eager():
    # fp32 on CPU: torch's grouped_mm shape check asks for bf16 under compile, so the experts run eagerly
    torch.manual_seed(0)
    m = dsv3.DeepSeekV3(small_cfg(n_layers=2)).train()
    x, y = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    ref = m(x, y, return_logits=False)
    ref.loss.backward()
    g_ref = grads(m)
    m.zero_grad()
    names = [n for n, _ in m.named_parameters()]
    m.compile_blocks()
    assert [n for n, _ in m.named_parameters()] == names  # checkpoints see the same keys
    out = m(x, y, return_logits=False)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    for a, b in zip(grads(m), g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-3)


@pytest.mark.slow
def test_compile_blocks_bf16_accelerator_path_one_graph_for_all_blocks(monkeypatch):
    """The path CUDA takes (bf16 grouped_mm over unpadded expert groups) compiled per block: every block reuses
    one graph (compile time flat in depth), and the step matches eager to bf16 precision."""
    import torch._dynamo

    import dsv3.moe as moe

    def unpadded(x, token, w1, w2, w3, load, g):  # what CUDA runs instead of the CPU-only padding
        return moe._grouped_swiglu(x.index_select(0, token), w1, w2, w3, load, g)

    monkeypatch.setattr(moe, "_padded_grouped_swiglu", unpadded)
    torch.manual_seed(0)
    m = dsv3.DeepSeekV3(small_cfg(n_layers=3)).train()
    x, y = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = m(x, y, return_logits=False)
    ref.loss.backward()
    g_ref = grads(m)
    m.zero_grad()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    m.compile_blocks()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, y, return_logits=False)
    out.loss.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-2)
    a, b = torch.cat([g.flatten() for g in grads(m)]), torch.cat([g.flatten() for g in g_ref])
    assert (a - b).norm() / b.norm() < 2e-2


@pytest.mark.parametrize("inplace", [True, False])
def test_fused_cross_entropy_of_unlikely_targets(inplace, monkeypatch):
    """Targets with a probability below fp32's range (CE of hundreds of nats) get the exact loss on both paths
    (the CPU path takes -log of the softmax and recomputes such rows), and the gradients stay those of the plain
    loss; chunks of 3 rows put one such row in a chunk with ordinary ones."""
    monkeypatch.setattr(model_mod, "INPLACE_CE_DEVICES", ("cpu",) if inplace else ())
    monkeypatch.setattr(model_mod, "CE_CHUNK", 3)
    monkeypatch.setattr(model_mod, "CE_CHUNK_ELEMS", 0)
    monkeypatch.setattr(model_mod, "CE_CHUNK_ACCEL", 3)
    torch.manual_seed(0)
    h = torch.randn(7, 16)
    w = torch.randn(64, 16)
    t = torch.randint(0, 64, (7,))
    h[1] *= 40  # logits spread over hundreds: one row's target far below the top
    t[1] = (h[1] @ w.t()).argmin()
    h, w = h.requires_grad_(), w.requires_grad_()
    ref = F.cross_entropy(h @ w.t(), t)
    assert (F.cross_entropy(h @ w.t(), t, reduction="none")[1] > 150).item()  # p_target underflows fp32
    out = model_mod.linear_cross_entropy(h, w, t)
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    g_out, g_ref = torch.autograd.grad(out, (h, w)), torch.autograd.grad(ref, (h, w))
    for a, b in zip(g_out, g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_fused_cross_entropy_second_backward_fails_loudly():
    """backward scales the saved gradients in place; a second backward must raise, never return wrong grads."""
    h, w = torch.randn(8, 4, requires_grad=True), torch.randn(10, 4, requires_grad=True)
    loss = model_mod.linear_cross_entropy(h, w, torch.randint(0, 10, (8,)))
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
        model_mod.linear_cross_entropy(steps[i][0], w, steps[i][1]).backward()
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
    pending = model_mod.linear_cross_entropy(steps[0][0], w, steps[0][1])  # saved dW, backward not yet run
    assert torch.allclose(grad_of(2), ref[2], atol=1e-7, rtol=1e-5)
    pending.backward()
    assert torch.allclose(w.grad, ref[0], atol=1e-7, rtol=1e-5)


def test_workspace_keeps_one_buffer_per_dtype():
    """Alternating fp32 and bf16 calls (as the interleaved benchmark's steps do) each get their own kept buffer
    back, instead of each call replacing the other dtype's; the head's values stay right across the switch."""
    owner = type("Owner", (), {})()  # any weak-referenceable object
    a32 = layers.workspace(owner, "z", (8, 4), torch.float32)
    a16 = layers.workspace(owner, "z", (8, 4), torch.bfloat16)
    assert layers.workspace(owner, "z", (8, 4), torch.float32) is a32  # the kept tensor itself: no allocation
    assert layers.workspace(owner, "z", (8, 4), torch.bfloat16) is a16
    assert layers.workspace(owner, "z", (4, 4), torch.float32).shape == (4, 4)  # a new shape: a new buffer

    torch.manual_seed(123)
    w = torch.randn(64, 16, requires_grad=True)
    h, t = torch.randn(12, 16), torch.randint(0, 64, (12,))
    ref = torch.autograd.grad(F.cross_entropy(h @ w.t(), t), w)[0]
    for bf16 in (False, True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model_mod.linear_cross_entropy(h, w, t).backward()
        assert torch.allclose(w.grad, ref, atol=2e-2 if bf16 else 1e-7, rtol=2e-2 if bf16 else 1e-5)
        w.grad = None
