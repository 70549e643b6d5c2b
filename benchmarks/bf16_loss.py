"""Does bf16 autocast train like fp32? Two short tiny-preset runs of `dsv3.train` (the trainer the CLI runs) on the
corpus, same seed (so the same init and batches), `dtype="fp32"` and `dtype="bf16"`; prints both loss curves and
the largest relative gap of their running means.

    python benchmarks/bf16_loss.py [--steps 60] [--lr 1e-3] [--seed 0]   (offline: DSV3_CORPUS, TIKTOKEN_CACHE_DIR)
"""

import argparse
import json
import tempfile

import dsv3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the tiny preset's)")
    p.add_argument("--seed", type=int, default=0, help="init and data order, the same for both runs")
    args = p.parse_args()
    curves = {}
    for dtype in ("fp32", "bf16"):
        with tempfile.TemporaryDirectory() as out:
            h = dsv3.train(preset="tiny", steps=args.steps, batch_size=args.batch, seq_len=args.seq, lr=args.lr,
                           seed=args.seed, dtype=dtype, eval_interval=args.steps, eval_batches=1, out=out,
                           progress=False)
        curves[dtype] = [r["ce"] for r in h.train]
    k = 10  # compare running means of 10 steps: single-batch losses are noisy in both precisions
    mean = {p: [sum(c[i - k:i]) / k for i in range(k, len(c) + 1)] for p, c in curves.items()}
    gap = max(abs(a - b) / a for a, b in zip(mean["fp32"], mean["bf16"], strict=True))
    print(json.dumps({"steps": args.steps, "batch": args.batch, "seq": args.seq, "fp32": curves["fp32"],
                      "bf16": curves["bf16"], "max_rel_gap_running_mean10": gap,
                      "final_mean10": {p: m[-1] for p, m in mean.items()}}))


if __name__ == "__main__":
    main()
