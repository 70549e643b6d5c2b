"""Devices and precision: the `auto` choices (availability patched), and fp16 autocast + GradScaler training on the
CPU (finite losses, an overflow skips the step and lowers the scale, resume equals the uninterrupted run)."""

import os

import pytest
import torch

import dsv3
from dsv3 import devices


@pytest.mark.parametrize("cuda, mps, picked", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, picked):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(devices, "mps_available", lambda: mps)
    assert devices.resolve_device("auto") == devices.resolve_device(None) == torch.device(picked)
    assert devices.resolve_device("cpu") == torch.device("cpu")  # a name given is taken as it is


@pytest.mark.parametrize("device, bf16, want", [("cuda", True, torch.bfloat16), ("cuda", False, torch.float16),
                                                ("mps", True, torch.bfloat16), ("mps", False, None)])
def test_auto_precision_is_bf16_where_native_else_fp16_on_cuda(monkeypatch, device, bf16, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16 or including_emulation)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: bf16)
    assert devices.autocast_dtype("auto", torch.device(device)) == want
    assert devices.autocast_dtype("fp16", torch.device(device)) == torch.float16
    assert devices.autocast_dtype("fp32", torch.device(device)) is None


def test_auto_precision_on_the_cpu_is_fp32_and_the_names_are_checked():
    assert devices.autocast_dtype("auto", torch.device("cpu")) is None
    assert devices.autocast_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="^dtype must be one of 'auto', 'fp32', 'bf16', 'fp16', got 'fp8'$"):
        dsv3.TrainConfig(dtype="fp8")


# --- fp16 + GradScaler on the CPU (torch runs both there) ---
corpus = pytest.mark.skipif(not os.environ.get("DSV3_CORPUS"), reason="needs DSV3_CORPUS (Tiny Shakespeare)")
FAST = dict(dim=32, n_layers=2, n_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            moe_inter_dim=32, bias_update_speed=1e-3)


@pytest.fixture
def overflow_at(monkeypatch, tmp_path_factory):
    """overflow_at(n): in each following run, the n-th training step's embedding gradient is inf (an overflow, as
    an fp16 backward with too large a scale produces one)."""
    monkeypatch.setenv("DSV3_DATA_DIR", str(tmp_path_factory.getbasetemp() / "dsv3-cache"))
    when = {"step": None, "calls": 0}
    forward = dsv3.DeepSeekV3.forward

    def poisoned(self, *a, **k):
        if self.training:
            when["calls"] += 1
            if when["calls"] == when["step"]:
                def inf_grad(g):
                    handle.remove()
                    return torch.full_like(g, float("inf"))

                handle = self.embed.weight.register_hook(inf_grad)
        return forward(self, *a, **k)

    monkeypatch.setattr(dsv3.DeepSeekV3, "forward", poisoned)
    return lambda step: when.update(step=step, calls=0)


def _run(out, **kw):
    base = dict(preset="tiny", model_overrides=FAST, batch_size=4, seq_len=32, lr=3e-3, warmup=2, threads=1,
                eval_interval=1000, eval_batches=1, progress=False, dtype="fp16", out=str(out))
    return dsv3.train(**{**base, **kw})


def _params(path):
    return dict(dsv3.load_checkpoint(path).named_parameters())


@corpus
def test_fp16_overflow_skips_the_step_and_lowers_the_scale(tmp_path, overflow_at, capsys):
    overflow_at(3)
    h = _run(tmp_path, steps=5, save_interval=1, keep=10, progress=True)
    assert "training on cpu, fp16 autocast + loss scaling\n" in capsys.readouterr().err  # says what it runs on
    assert all(torch.isfinite(torch.tensor(h.column("loss"))))
    assert h.column("loss")[-1] < h.column("loss")[0]
    assert h.column("skipped_steps") == [0, 0, 1, 1, 1] and h.skipped_steps == 1
    assert h.column("loss_scale") == [65536.0, 65536.0, 65536.0, 32768.0, 32768.0]  # halved after the overflow
    before, skipped, after = (_params(tmp_path / f"step_{s:06d}") for s in (2, 3, 4))
    assert all(torch.equal(before[k], skipped[k]) for k in before)  # the optimizer step did not run
    assert not all(torch.equal(skipped[k], after[k]) for k in before)  # the next one did
    state = dsv3.load_checkpoint(tmp_path, with_state=True)[1]
    assert state["scaler"]["scale"] == 32768.0


@corpus
def test_fp16_resume_equals_the_uninterrupted_run(tmp_path, overflow_at):
    overflow_at(3)  # step 2's first micro-batch: the resumed run must start from the lowered scale
    full = _run(tmp_path / "full", steps=6, grad_accum=2, decay_steps=10)
    overflow_at(3)
    _run(tmp_path / "part", steps=4, grad_accum=2, decay_steps=10)
    overflow_at(None)
    rest = dsv3.train(resume=tmp_path / "part", steps=2, progress=False)
    assert rest.column("step") == list(range(1, 7))
    for key in ("loss", "ce", "grad_norm", "loss_scale", "skipped_steps", "expert_load"):
        assert rest.column(key) == full.column(key), key  # exactly equal
    a, b = full.model.state_dict(), rest.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
