"""What the compiled decoding step's one-row matmuls cost on the CPU, with and without dsv3's two changes to them.

    python benchmarks/gemv.py [--preset 174m] [--reps 8]

A batch-1 decoding step multiplies one row by every weight: matrix-vector products, bound by reading the
weights. `DeepSeekV3.decode_step(compiled=True)` compiles its blocks with `dsv3.kernels.decode._options`, its
one-row products written as multiply-reduces (`dsv3.kernels.linear.rows_inner`), and runs the head the same way
(`dsv3.kernels.decode.head`). This times that step (random weights, 32 new tokens from position 32, interleaved
repetitions, median ms per token) three ways:
  before      blocks compiled with cpp_wrapper only, one-row products by torch's BLAS (MKL on x86), eager head
  +blocks     blocks as decode_step compiles them, eager head
  +head       both: what decode_step runs
and the head alone, eager F.linear vs compiled `head`, with the weight bytes read per second.
"""

import argparse

import torch
import torch.nn.functional as F
from bench import interleaved

import dsv3
import dsv3.kernels.decode as dec
import dsv3.kernels.linear as kl
from dsv3.model import static_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="174m")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = dsv3.ModelConfig.preset(args.preset)
    model = dsv3.DeepSeekV3(cfg).eval()
    cache = model.new_cache(1, 2 * args.tokens)
    tok = torch.zeros(1, 1, dtype=torch.long)
    compiled_block, compiled_head, few = dec.compiled_step, dec.compiled_head, kl.FEW_ROWS
    blocks = {
        "mkl": torch.compile(static_step, fullgraph=True, options={"cpp_wrapper": True}),
        "dsv3": compiled_block(static_step, "cpu"),
    }

    def eager_head(device_type):
        return F.linear

    def variant(block, head):
        def run():
            kl.FEW_ROWS = 0 if block == "mkl" else few  # "mkl": the table leaves the row to F.linear
            dec.compiled_step = lambda step, device_type: blocks[block]
            dec.compiled_head = head
            cache.pos = args.tokens
            for _ in range(args.tokens):
                model.decode_step(tok, cache, compiled=True)
        return run

    fns = {"before": variant("mkl", eager_head), "+blocks": variant("dsv3", eager_head),
           "+head": variant("dsv3", compiled_head)}
    w = model.head.weight
    x = torch.randn(1, 1, cfg.dim)
    head_fn = compiled_head("cpu")
    fns["head eager"] = lambda: [F.linear(model.norm(x)[:, -1], w) for _ in range(args.tokens)]
    fns["head compiled"] = lambda: [head_fn(model.norm(x), w) for _ in range(args.tokens)]
    try:
        with torch.no_grad():
            res = interleaved(fns, reps=args.reps, warmup=1)
    finally:
        dec.compiled_step, dec.compiled_head, kl.FEW_ROWS = compiled_block, compiled_head, few
    print(f"{args.preset}, batch 1, fp32, threads {torch.get_num_threads()}: ms per token (median of {args.reps})")
    for name, r in res.items():
        ms = r["median"] / args.tokens * 1e3
        extra = f"  weight read at {w.numel() * 4 / (ms / 1e3) / 1e9:.1f} GB/s" if name.startswith("head") else \
            f"  {1e3 / ms:.1f} tokens/s"
        print(f"  {name:14s} {ms:8.2f} ms{extra}  (spread {r['spread']:.0%})")


if __name__ == "__main__":
    main()
