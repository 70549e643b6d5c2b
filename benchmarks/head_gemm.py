"""The output head's three GEMMs (logits, dh, dW) for one 4096-row chunk: vocabulary 50,257 as is, only the
row stride padded (a view of a 50,304-wide buffer), and the vocabulary padded to 50,304. CUDA only.

    python benchmarks/head_gemm.py

Why dsv3's fused head + cross-entropy pads the vocabulary to a multiple of 64 on accelerators: with the odd
50,257, cuBLAS falls back to slower kernels. Prints the median of 10 runs after 3 warm-ups (CUDA events) and the
TFLOP/s of the unpadded problem's FLOPs.
"""

import torch

V, Vp, D, R = 50257, 50304, 576, 4096


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("head_gemm.py times cuBLAS: it needs a CUDA device")
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    h = torch.randn(R, D, device=dev, dtype=dt)
    w = torch.randn(V, D, device=dev, dtype=dt)
    wp = torch.nn.functional.pad(w, (0, 0, 0, Vp - V))  # zero rows
    g = torch.randn(R, V, device=dev, dtype=dt)
    gp = torch.nn.functional.pad(g, (0, Vp - V))  # zero columns
    gv = gp[:, :V]  # 50,257 columns with a 50,304-element row stride
    zv = torch.empty(R, Vp, device=dev, dtype=dt)[:, :V]
    cases = {
        "logits h @ W.T": lambda: torch.mm(h, w.t()),
        "logits h @ W.T, out= padded view": lambda: torch.mm(h, w.t(), out=zv),
        "logits h @ W.T, vocab 50304": lambda: torch.mm(h, wp.t()),
        "dh g @ W": lambda: g @ w,
        "dh g @ W, g a padded view": lambda: gv @ w,
        "dh g @ W, vocab 50304": lambda: gp @ wp,
        "dW g.T @ h": lambda: g.t() @ h,
        "dW g.T @ h, g a padded view": lambda: gv.t() @ h,
        "dW g.T @ h, vocab 50304": lambda: gp.t() @ h,
    }
    for name, f in cases.items():
        for _ in range(3):
            f()
        ms = []
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            f()
            b.record()
            torch.cuda.synchronize()
            ms.append(a.elapsed_time(b))
        m = sorted(ms)[5]
        print(f"{name:36s} {m:7.3f} ms {2 * R * V * D / m / 1e9:6.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
