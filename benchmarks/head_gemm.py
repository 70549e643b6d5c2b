"""The output head's three GEMMs (logits, dh, dW) for one 4096-row chunk, vocabulary 50,257 as is and padded.

    python benchmarks/head_gemm.py [--device cuda]

Why dsv3's fused head + cross-entropy pads the vocabulary to a multiple of 64 off the CPU: with an odd
vocabulary the GEMMs' leading dimensions are unaligned and cuBLAS falls back to slower kernels.
Prints the median time of 10 runs after 3 warm-ups and the TFLOP/s of the unpadded problem's FLOPs.
"""

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, default=4096)
    args = p.parse_args()
    dev, rows = args.device, args.rows
    V, Vp, D = 50257, 50304, 576
    dt = torch.bfloat16
    torch.manual_seed(0)
    h = torch.randn(rows, D, device=dev, dtype=dt)
    w = torch.randn(V, D, device=dev, dtype=dt)
    wp = torch.nn.functional.pad(w, (0, 0, 0, Vp - V))
    g = torch.randn(rows, V, device=dev, dtype=dt)
    gp = torch.nn.functional.pad(g, (0, Vp - V))
    cases = {
        "logits h @ W.T, vocab 50257": lambda: h @ w.t(),
        "logits h @ W.T, vocab 50304": lambda: h @ wp.t(),
        "dh g @ W, vocab 50257": lambda: g @ w,
        "dh g @ W, vocab 50304": lambda: gp @ wp,
        "dW g.T @ h, vocab 50257": lambda: g.t() @ h,
        "dW g.T @ h, vocab 50304": lambda: gp.t() @ h,
    }
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for name, f in cases.items():
        for _ in range(3):
            f()
        times = []
        for _ in range(10):
            sync()
            t = time.perf_counter()
            f()
            sync()
            times.append(time.perf_counter() - t)
        s = sorted(times)[5]
        print(f"{name:30s} {s * 1e3:8.3f} ms {2 * rows * V * D / s / 1e12:8.1f} TFLOP/s")


if __name__ == "__main__":
    main()
