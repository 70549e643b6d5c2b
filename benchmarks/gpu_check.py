"""Correctness of dsv3 on an accelerator before timing it (the CPU test suite cannot reach these paths).

Checks, each printed as PASS/FAIL with the number it compared:
  1. fp32 logits and loss on the device equal the CPU's (same weights);
  2. the bf16 grouped_mm expert dispatch equals the fp32 reference (eq. 12, with `dsv3.kernels.disabled()`)
     to bf16 precision;
  3. greedy decoding with the absorbed latent cache gives the same tokens as without a cache, and the compiled
     decoding step (`decode_step(compiled=True)`, bf16 autocast) gives the cached forward's logits;
  4. a bf16 training step with the blocks compiled (`compile_blocks`) matches the eager step;
  5. 30 bf16 AdamW steps on one batch drive the loss down (the step learns).

    python benchmarks/gpu_check.py [--device cuda]      # exit status 1 if any check fails
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F

import dsv3
from dsv3.generate import generate_tokens


def small(vocab: int = 512, **kw) -> dsv3.ModelConfig:
    base = dict(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, moe_inter_dim=32, dense_inter_dim=96, max_seq_len=128,
                score_func="sigmoid")
    return dsv3.ModelConfig.preset("174m", **(base | kw))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(p.parse_args().device)
    print(f"torch {torch.__version__}, device {dev}" +
          (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "") +
          f", F.grouped_mm: {hasattr(F, 'grouped_mm')}")
    results = []

    def check(name, value, ok):
        results.append(ok)
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.3g}", flush=True)

    # 1. fp32 forward on the device == on the CPU
    torch.manual_seed(123)
    cpu = dsv3.DeepSeekV3(small()).eval()
    acc = copy.deepcopy(cpu).to(dev)
    x = torch.randint(0, 512, (2, 48))
    with torch.no_grad():
        a, b = acc(x.to(dev), x.to(dev)), cpu(x, x)
    d = rel(a.logits.cpu(), b.logits)
    check("fp32 logits, device vs CPU (relative)", d, d < 1e-4)

    # 2. bf16 grouped dispatch vs the fp32 per-token reference
    torch.manual_seed(123)
    moe = dsv3.DeepSeekV3(small(dim=128, moe_inter_dim=96)).layers[0].ffn.to(dev)
    h = torch.randn(300, 128, device=dev)
    with torch.no_grad():  # eq. 12 in fp32, expert by expert (the reference)
        with dsv3.kernels.disabled():
            ref = moe(h[None])[0][0]
    moe.train()
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        out = moe(h[None])[0][0]
    d = rel(out.float(), ref)
    check("bf16 dispatch vs fp32 per-token reference (relative)", d, d < 2e-2)

    # 3. absorbed latent cache == no cache, greedy
    torch.manual_seed(123)
    m = dsv3.DeepSeekV3(small()).to(dev).eval()
    prompt = torch.randint(0, 512, (1, 16), device=dev)
    seqs = {c: torch.stack(list(generate_tokens(m, prompt, 40, temperature=0, cache=c)), 1)
            for c in ("absorbed", "none")}
    same = (seqs["absorbed"] == seqs["none"]).float().mean().item()
    check("greedy tokens equal, absorbed cache vs no cache (fraction)", same, same == 1.0)
    tokens = torch.randint(0, 512, (2, 40), device=dev)
    caches = [m.new_cache(2, 40, dtype=torch.bfloat16) for _ in range(2)]
    outs = [[], []]
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
        for c in caches:
            m(tokens[:, :8], cache=c)
        for t in range(8, 40):
            outs[0].append(m(tokens[:, t:t + 1], cache=caches[0]).logits[:, -1].float())
            outs[1].append(m.decode_step(tokens[:, t:t + 1], caches[1], compiled=True).float())
    d = rel(torch.cat(outs[1]), torch.cat(outs[0]))
    check("compiled decode_step vs cached forward, bf16 logits (relative)", d, d < 2e-2)

    # 4. compiled blocks == eager, bf16 training step
    torch.manual_seed(123)
    eager = dsv3.DeepSeekV3(small(n_layers=3)).to(dev).train()
    comp = copy.deepcopy(eager)
    comp.compile_blocks()
    x, y = torch.randint(0, 512, (4, 64), device=dev), torch.randint(0, 512, (4, 64), device=dev)
    losses, gs = [], []
    for mod in (eager, comp):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = mod(x, y, return_logits=False).loss
        loss.backward()
        losses.append(loss.item())
        gs.append(torch.cat([q.grad.flatten() for q in mod.parameters()]))
    d = abs(losses[1] / losses[0] - 1)
    check("compiled vs eager bf16 loss (relative)", d, d < 1e-2)
    d = rel(gs[1], gs[0])
    check("compiled vs eager bf16 gradients (relative)", d, d < 3e-2)

    # 5. the bf16 step learns
    opt = torch.optim.AdamW(eager.parameters(), lr=3e-3, fused=True)
    first = None
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = eager(x, y, return_logits=False).loss
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    check(f"bf16 AdamW on one batch: final / first loss (first {first:.3f})", loss.item() / first,
          loss.item() < 0.5 * first)
    print(f"gpu_check: {sum(results)}/{len(results)} passed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
