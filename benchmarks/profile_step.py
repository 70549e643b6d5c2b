"""Profile one training step (forward with the fused head + CE, backward, fused AdamW) with torch.profiler.

    python benchmarks/profile_step.py --preset tiny --batch 16 --seq 128 [--bf16] [--threads N]
    python benchmarks/profile_step.py --device cuda --preset 174m --batch 16 --seq 1024 --bf16 [--compile]

Prints the median step time of 5 steps after warm-up, then the ops that took the most self time (CPU time on
the CPU; kernel time on a GPU, whose total (the table's footer) far below the step's wall time means the GPU
waits for the host).
"""

import argparse

import torch
from bench import interleaved
from torch.profiler import ProfilerActivity, profile

import dsv3
import dsv3.kernels.head as head_mod


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="compile the blocks (DeepSeekV3.compile_blocks)")
    p.add_argument("--ce-chunk", type=int, help="rows per chunk of the fused head + CE off the CPU (CE_CHUNK_ACCEL)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", type=int, default=15, help="ops to list")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ce_chunk:
        head_mod.CE_CHUNK_ACCEL = args.ce_chunk
    dev = torch.device(args.device)
    torch.manual_seed(0)
    cfg = dsv3.ModelConfig.preset(args.preset)
    model = dsv3.DeepSeekV3(cfg).to(dev)
    if args.compile:
        model.compile_blocks()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=dev)
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            out = model(x, y, return_logits=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_s = interleaved({"step": step}, reps=5, warmup=3, device=dev.type)["step"]["median"]
    print(f"{args.preset} {args.batch}x{args.seq} {'bf16' if args.bf16 else 'fp32'} on {dev}"
          f"{' compiled' if args.compile else ''}, threads {torch.get_num_threads()}: step {step_s:.4f} s "
          f"({args.batch * args.seq / step_s:,.0f} tokens/s)")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        sync()
    avg = prof.key_averages()
    if dev.type == "cuda":  # the table's footer sums the kernel time, to hold against the wall time above
        print(avg.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    else:
        print(avg.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
