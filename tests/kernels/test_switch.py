"""The one switch: with the kernels off a training step runs no custom autograd Function and gives the default
path's loss and gradients, and greedy generation the same ids and routing; DSV3_KERNELS=0 and `--no-kernels` turn
them off too; the fast_path mechanism itself, and imports running one way (reference files -> kernels)."""

import ast
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, small_cfg

import dsv3
from dsv3 import kernels


def custom_nodes(loss: torch.Tensor) -> set[str]:
    """Names of the custom autograd Functions (torch.autograd.Function subclasses) in loss's graph."""
    seen, todo, found = set(), [loss.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__.endswith("Backward") and hasattr(fn, "_forward_cls"):
            found.add(fn._forward_cls.__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return found


def step(model, x, y, amp: bool = False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = model(x, y, return_logits=False)
    nodes = custom_nodes(out.loss)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}, nodes


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_training_step_without_kernels_equals_the_default(q_lora_rank):
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(small_cfg(q_lora_rank=q_lora_rank, n_dense_layers=1, n_layers=3)).train()
    x, y = torch.randint(0, 512, (3, 40)), torch.randint(0, 512, (3, 40))
    y[0, :4] = -100
    fast, g_fast, nodes = step(model, x, y)
    assert {"OneDNNLinear", "CausalAttention", "KeptGradSwiGLU", "LinearCrossEntropy", "TiedEmbedding"} <= nodes
    with kernels.disabled():
        assert not kernels.enabled()
        ref, g_ref, ref_nodes = step(model, x, y)
    assert kernels.enabled() and ref_nodes == set()  # plain PyTorch: no custom autograd node at all
    for k in ("loss", "ce_loss", "aux_loss", "z_loss"):
        assert abs(getattr(fast, k).item() - getattr(ref, k).item()) <= 1e-5
    assert g_fast.keys() == g_ref.keys()
    for name, g in g_ref.items():
        assert (g_fast[name] - g).abs().max() <= 1e-4 * g.abs().max(), name


def test_bf16_training_step_without_kernels_is_as_close_as_bf16_allows():
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(small_cfg()).train()
    x, y = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
    ref32, g32, _ = step(model, x, y)
    fast, g_fast, nodes = step(model, x, y, amp=True)
    assert "KeptGradCast" in nodes and "LinearCrossEntropy" in nodes
    with kernels.disabled():
        ref, g_ref, ref_nodes = step(model, x, y, amp=True)
    assert ref_nodes == set()
    assert fast.loss.item() == pytest.approx(ref.loss.item(), rel=1e-2)
    for name, g in g32.items():  # both bf16 paths are about as far from fp32 as each other
        err_fast = (g_fast[name] - g).norm() / g.norm()
        err_ref = (g_ref[name] - g).norm() / g.norm()
        assert err_fast < 0.05 and err_ref < 0.05, (name, err_fast, err_ref)


@pytest.mark.parametrize("cache", ["absorbed", "none"])
def test_generation_is_the_same_with_and_without_kernels(cache):
    """Greedy `generate_tokens` (prefill through the CPU attention kernel and oneDNN's linears, then decoding steps):
    the same ids and the same routing with the kernels off."""
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(small_cfg()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)  # routing and logits far from uniform: no near-ties for greedy decoding to fall on
    prompt = torch.randint(0, 512, (2, 20))
    runs = []
    for on in (True, False):
        trace = []
        with kernels.disabled() if not on else torch.no_grad():
            ids = torch.stack(list(dsv3.generate_tokens(model, prompt, 12, temperature=0, cache=cache, trace=trace)))
        runs.append((ids, torch.cat([t[0] for t in trace], 2), torch.cat([t[1] for t in trace], 2)))
    (ids, experts, gates), (ref_ids, ref_experts, ref_gates) = runs
    assert ids.shape == (12, 2) and torch.equal(ids, ref_ids)
    assert experts.shape[2] == 32 and torch.equal(experts, ref_experts)
    assert (gates - ref_gates).abs().max() <= 1e-5


def test_fast_path_takes_the_kernel_where_it_applies_and_the_reference_elsewhere():
    calls = []

    def only_negative(reference, x):
        calls.append("kernel")
        return -2 * -x if x < 0 else None

    @kernels.fast_path(only_negative)
    def double(x):
        calls.append("reference")
        return 2 * x

    assert double(3) == 6 and double(-3) == -6
    assert calls == ["kernel", "reference", "kernel"]
    with kernels.disabled():
        assert double(-1) == -2
    assert calls[-1] == "reference" and double.kernel is only_negative and double.reference(-4) == -8


def test_imports_run_one_way_from_the_reference_files_to_the_kernels():
    """Nothing under dsv3/kernels/ imports a module of dsv3 outside kernels/ (the reference files import kernels)."""
    for path in sorted((ROOT / "dsv3" / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level != 2 and not (node.module or "").startswith("dsv3"), (path.name, node.module)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("dsv3") for a in node.names), path.name


def test_environment_variable_and_cli_flag_turn_the_kernels_off(tmp_path):
    code = "import dsv3; print(dsv3.kernels.enabled())"
    env = {**os.environ, "DSV3_KERNELS": "0", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    env["DSV3_KERNELS"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    from dsv3.__main__ import build_parser

    for cmd in (["train"], ["generate", "--checkpoint", "x"], ["bench"]):
        cmd = [*cmd, "--no-kernels"]
        assert build_parser().parse_args(cmd).no_kernels is True
