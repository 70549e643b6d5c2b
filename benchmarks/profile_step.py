"""Profile one training step (forward with the fused head + CE, backward, fused AdamW) with torch.profiler.

    python benchmarks/profile_step.py --preset tiny --batch 16 --seq 128 [--bf16] [--threads N]

Prints the median step time of 3 steps after warm-up, then the ops that took the most self CPU time.
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import dsv3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", type=int, default=15, help="ops to list")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = dsv3.ModelConfig.preset(args.preset)
    model = dsv3.DeepSeekV3(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            out = model(x, y, return_logits=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    print(f"{args.preset} {args.batch}x{args.seq} {'bf16' if args.bf16 else 'fp32'} "
          f"threads {torch.get_num_threads()}: step {sorted(times)[1]:.3f} s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
