"""The whole model: shapes, causality, the loss and its single label shift, bad input."""

import pytest
import torch
import torch.nn.functional as F
from conftest import small_cfg

import dsv3
from dsv3.layers import Expert
from dsv3.moe import MoE


def test_loss_parts_equal_their_formulas(cfg):
    """ce = F.cross_entropy of the logits; aux = alpha * mean over MoE layers of N sum_i f_i P_i; z = its
    coefficient * mean of mean_t logsumexp(router logits)^2: each recomputed from the routers' own inputs."""
    model = dsv3.DeepSeekV3(cfg.replace(aux_loss_coef=0.03, z_loss_coef=0.002, n_dense_layers=1, n_layers=3))
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
             for m in model.moe_layers()]
    tokens, targets = torch.randint(0, cfg.vocab_size, (3, 17)), torch.randint(0, cfg.vocab_size, (3, 17))
    out = model(tokens, targets)
    for h in hooks:
        h.remove()
    assert out.logits.shape == (3, 17, cfg.vocab_size) and model(tokens).loss is None
    ce = F.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), targets.reshape(-1))
    balance, z = [], []
    for m, x in zip(model.moe_layers(), inputs, strict=True):
        logits = x @ m.gate.weight.T
        probs = logits.softmax(-1)
        top = probs.topk(cfg.n_activated_experts, dim=-1).indices
        f = torch.bincount(top.flatten(), minlength=cfg.n_routed_experts).float() / top.numel()
        balance.append(cfg.n_routed_experts * (f * probs.mean(0)).sum())
        z.append(torch.logsumexp(logits, -1).square().mean())
    assert len(balance) == 2  # the dense first layer has no router
    assert out.ce_loss.item() == pytest.approx(ce.item(), rel=1e-5)
    assert out.aux_loss.item() == pytest.approx(0.03 * torch.stack(balance).mean().item(), rel=1e-5)
    assert out.z_loss.item() == pytest.approx(0.002 * torch.stack(z).mean().item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((ce + out.aux_loss + out.z_loss).item(), rel=1e-5)


def test_loss_is_next_token_ce_shifted_exactly_once(model, cfg):
    seq = torch.randint(0, cfg.vocab_size, (2, 21))
    x, y = seq[:, :-1], seq[:, 1:]  # the data pipeline's one shift: y[t] = x[t+1]
    out = model(x, y)
    logits = out.logits
    # the model must score logits[t] against y[t] (= token t+1), not against y[t+1] (= token t+2)
    once = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), y.reshape(-1))
    twice = F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), y[:, 1:].reshape(-1))
    assert out.ce_loss.item() == pytest.approx(once.item(), rel=1e-6)
    assert abs(once.item() - twice.item()) > 1e-4
    # ignore_index -100 drops positions (for padding)
    y2 = y.clone()
    y2[:, :10] = -100
    part = F.cross_entropy(logits[:, 10:].reshape(-1, cfg.vocab_size), y[:, 10:].reshape(-1))
    assert model(x, y2).ce_loss.item() == pytest.approx(part.item(), rel=1e-5)


def test_causality(model, cfg):
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(tokens).logits, model(changed).logits
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_dense_first_layers_and_dense_baseline():
    m = dsv3.DeepSeekV3(small_cfg(n_layers=3, n_dense_layers=1))
    assert isinstance(m.layers[0].ffn, Expert) and all(isinstance(b.ffn, MoE) for b in m.layers[1:])
    assert len(m.moe_layers()) == 2 and m.expert_loads().shape == (2, 8)
    base = dsv3.DeepSeekV3(small_cfg(attn="gqa", ffn="dense", n_kv_heads=2))
    out = base(torch.randint(0, 512, (1, 8)), torch.randint(0, 512, (1, 8)))
    assert out.aux_loss.item() == 0 and out.z_loss.item() == 0 and base.moe_layers() == []


def test_init_scales(cfg):
    torch.manual_seed(0)
    m = dsv3.DeepSeekV3(cfg.replace(n_layers=8, dim=256, vocab_size=4096))
    assert m.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.layers[0].attn.wo.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # / sqrt(2 * 8)
    assert m.layers[0].ffn.experts.w2.std().item() == pytest.approx(0.02 / 4, rel=0.05)


def test_bf16_autocast_forward_backward_on_cpu(model, cfg):
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    model.train()
    ref = model(tokens, tokens).ce_loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, tokens)
    out.loss.backward()
    assert out.ce_loss.dtype == torch.float32
    assert abs(out.ce_loss.item() - ref.item()) < 0.05
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda c: torch.zeros(2, 4), "dtype torch.long"),
        (lambda c: [[1, 2, 3]], "torch.Tensor"),
        (lambda c: torch.zeros(4, dtype=torch.long), r"shape \(batch, seq_len\)"),
        (lambda c: torch.zeros(1, 0, dtype=torch.long), r"shape \(batch, seq_len\)"),
        (lambda c: torch.full((1, 4), c.vocab_size), "vocab_size=512"),
        (lambda c: torch.full((1, 4), -1), r"\[0, vocab_size=512\)"),
        (lambda c: torch.zeros(1, c.max_seq_len + 1, dtype=torch.long), "max_seq_len=128"),
    ],
)
def test_bad_tokens_raise_value_error(model, cfg, make, words):
    with pytest.raises(ValueError, match=words):
        model(make(cfg))


def test_last_logits_are_the_last_position_of_the_full_logits(model, cfg):
    x = torch.randint(0, cfg.vocab_size, (3, 9))
    with torch.no_grad():
        full = model(x).logits
        last = model(x, last_logits=True).logits
    assert last.shape == (3, 1, cfg.vocab_size) and torch.allclose(last, full[:, -1:], atol=1e-5)
    with pytest.raises(ValueError, match="last_logits=True is for decoding"):
        model(x, x, last_logits=True)


def test_bad_targets_and_cache_overflow(model, cfg):
    x = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="shaped like tokens"):
        model(x, x[:, :4])
    cache = model.new_cache(2, 10)
    model(x, cache=cache)
    with pytest.raises(ValueError, match="cache's free space"):
        model(x, cache=cache)
    with pytest.raises(ValueError, match="cache batch"):
        model(torch.zeros(3, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="cache length"):
        model.new_cache(1, cfg.max_seq_len + 1)


@pytest.mark.parametrize("bad", [512, -1, -101, 10_000])
@pytest.mark.parametrize("kernels_on", [True, False])
@pytest.mark.parametrize("return_logits", [True, False])
def test_out_of_range_targets_raise_naming_the_position(model, cfg, bad, kernels_on, return_logits):
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    y = x.clone()
    y[0, :3] = -100  # the ignore value is fine
    y[1, 5] = bad
    switch = dsv3.kernels.disabled() if not kernels_on else torch.enable_grad()
    message = rf"targets\[1, 5\] = {bad} is not a token id in \[0, vocab_size=512\)"
    with switch, pytest.raises(ValueError, match=message):
        model.train()(x, y, return_logits=return_logits)
    y[1, 5] = 0
    assert torch.isfinite(model(x, y, return_logits=return_logits).loss)
