"""Does bf16 autocast train like fp32? A short tiny-preset run on Tiny Shakespeare in both precisions from the
same init and the same batches; prints both loss curves and the largest relative gap of their running means.

    python benchmarks/bf16_loss.py [--steps 60]      (needs DSV3_CORPUS and TIKTOKEN_CACHE_DIR offline)
"""

import argparse
import json
import os

import torch

import dsv3
from dsv3.data import get_tokenizer


def run(precision: str, batches, steps: int) -> list[float]:
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(dsv3.ModelConfig.preset("tiny")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    losses = []
    for x, y in batches[:steps]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x, y, return_logits=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_bias()
        losses.append(out.ce_loss.item())
    return losses


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args()
    text = open(os.environ["DSV3_CORPUS"]).read()
    ids = torch.tensor(get_tokenizer().encode_ordinary(text))
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps):
        starts = torch.randint(0, len(ids) - args.seq - 1, (args.batch,), generator=g)
        seq = torch.stack([ids[s:s + args.seq + 1] for s in starts.tolist()])
        batches.append((seq[:, :-1], seq[:, 1:]))
    curves = {p: run(p, batches, args.steps) for p in ("fp32", "bf16")}
    k = 10  # compare running means of 10 steps: single-batch losses are noisy in both precisions
    mean = {p: [sum(c[i - k:i]) / k for i in range(k, len(c) + 1)] for p, c in curves.items()}
    gap = max(abs(a - b) / a for a, b in zip(mean["fp32"], mean["bf16"], strict=True))
    print(json.dumps({"steps": args.steps, "batch": args.batch, "seq": args.seq, "fp32": curves["fp32"],
                      "bf16": curves["bf16"], "max_rel_gap_running_mean10": gap,
                      "final_mean10": {p: m[-1] for p, m in mean.items()}}))


if __name__ == "__main__":
    main()
