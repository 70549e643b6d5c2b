"""torch.compile'd training blocks (the kernels under compile) keep the eager step's numbers."""

import pytest
import torch
from conftest import small_cfg

import dsv3


def grads(m):
    return [p.grad.clone() for p in m.parameters()]


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

    import dsv3.kernels.experts as ke

    def unpadded(x, token, w1, w2, w3, load, g):  # what CUDA runs instead of the CPU-only padding
        return ke._grouped_swiglu(x.index_select(0, token), w1, w2, w3, load, g)

    monkeypatch.setattr(ke, "_padded_grouped_swiglu", unpadded)
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


@pytest.mark.slow
def test_compiled_decoding_step_of_three_positions_equals_the_cached_forward():
    """DeepSeekV3.decode for T = 3 new positions (speculative verification's shape): eager (the blocks' own forward
    over cache.Slots) and compiled (kernels/decode.py: experts read by index, few-row products as W x^T) give the
    cached forward's logits, hidden states and cache entries, from one graph for both blocks and one for the head."""
    import torch._dynamo

    torch.manual_seed(0)
    m = dsv3.DeepSeekV3(small_cfg(n_layers=2)).eval()
    with torch.no_grad():
        for p in m.parameters():  # weights large enough that routing differs between the positions
            if p.dim() > 1:
                p.mul_(5)
    prompt, new = torch.randint(0, 512, (2, 6)), torch.randint(0, 512, (2, 3))
    key_mask = torch.ones(2, 16, dtype=torch.bool)
    key_mask[1, :2] = False  # row 1: a shorter prompt, left-padded
    caches = [m.new_cache(2, 16) for _ in range(3)]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.inference_mode():
        for c in caches:
            c.key_mask = key_mask
            m(prompt, cache=c)
        ref = m(new, cache=caches[0])
        outs = [m.decode(new, caches[1]), m.decode(new, caches[2], compiled=True)]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert not torch._dynamo.utils.counters["graph_break"]
    for out, c in zip(outs, caches[1:], strict=True):
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.hidden, ref.hidden, atol=1e-4, rtol=1e-4)
        assert c.pos == caches[0].pos == 9
        torch.testing.assert_close(c.c_kv[:, :, :9], caches[0].c_kv[:, :, :9], atol=1e-5, rtol=1e-5)
