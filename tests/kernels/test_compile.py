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
