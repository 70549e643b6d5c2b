"""The output head's three GEMMs (logits, dh, dW) for one chunk of rows: the vocabulary 50,257 as is, only the
row stride of the logits / gradient padded (a view of a 50,304-wide buffer), and the vocabulary padded to 50,304.

    python benchmarks/head_gemm.py                    # CUDA: bf16, a 4096-row chunk of the 174m preset (dim 576)
    python benchmarks/head_gemm.py --device cpu [--preset tiny]   # CPU: fp32, the fused head's CPU chunk

Why dsv3's fused head + cross-entropy pads: with the odd 50,257, cuBLAS falls back to slower kernels (so on
accelerators the vocabulary is padded), and on the CPU MKL writes the logits faster into 64-byte-aligned rows
(so there the buffers' row stride is padded, W is not). Prints the median time and the FLOP/s of the unpadded
problem: CUDA events, 10 runs after 3 warm-ups; CPU: `interleaved` of benchmarks/bench.py, 9 rounds after 2 warm-ups.
"""

import argparse

import torch
from bench import interleaved

import dsv3
import dsv3.kernels.head as head_mod

V, Vp = 50257, 50304


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="174m", help="its dim, and on the CPU its rows per chunk")
    args = p.parse_args()
    dev = torch.device(args.device)
    D = dsv3.ModelConfig.preset(args.preset).dim
    cpu = dev.type == "cpu"
    dt = torch.float32 if cpu else torch.bfloat16
    R = max(head_mod.CE_CHUNK, head_mod.CE_CHUNK_ELEMS // D) if cpu else 4096
    torch.manual_seed(0)
    h = torch.randn(R, D, device=dev, dtype=dt)
    w = torch.randn(V, D, device=dev, dtype=dt)
    wp = torch.nn.functional.pad(w, (0, 0, 0, Vp - V))  # zero rows
    g = torch.randn(R, V, device=dev, dtype=dt)
    gp = torch.nn.functional.pad(g, (0, Vp - V))  # zero columns
    gv = gp[:, :V]  # 50,257 columns with a 50,304-element row stride
    z, zv = torch.empty(R, V, device=dev, dtype=dt), torch.empty(R, Vp, device=dev, dtype=dt)[:, :V]
    zp = torch.empty(R, Vp, device=dev, dtype=dt)
    dw, dwp = torch.zeros(V, D, device=dev, dtype=dt), torch.zeros(Vp, D, device=dev, dtype=dt)
    cases = {
        "logits h @ W.T": lambda: torch.mm(h, w.t(), out=z),
        "logits h @ W.T, out= padded view": lambda: torch.mm(h, w.t(), out=zv),
        "logits h @ W.T, vocab 50304": lambda: torch.mm(h, wp.t(), out=zp),
        "dh g @ W": lambda: g @ w,
        "dh g @ W, g a padded view": lambda: gv @ w,
        "dh g @ W, vocab 50304": lambda: gp @ wp,
        "dW += g.T @ h": lambda: dw.addmm_(g.t(), h),
        "dW += g.T @ h, g a padded view": lambda: dw.addmm_(gv.t(), h),
        "dW += g.T @ h, vocab 50304": lambda: dwp.addmm_(gp.t(), h),
    }
    print(f"{dev.type} {str(dt).removeprefix('torch.')}: {R} rows x dim {D} x vocab {V}")
    flop = 2 * R * V * D
    if cpu:
        for name, r in interleaved(cases, reps=9, warmup=2).items():
            print(f"{name:36s} {r['median'] * 1e3:7.1f} ms {flop / r['median'] / 1e9:6.0f} GFLOP/s"
                  f"  spread {r['spread']:.0%}")
        return
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
        print(f"{name:36s} {m:7.3f} ms {flop / m / 1e9:6.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
