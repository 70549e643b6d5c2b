"""Decode speed and KV-cache size: absorbed vs naive latent cache vs no cache.

    python benchmarks/decode.py                       # tiny and 174m, prompt 32, 128 new tokens, batch 1
    OMP_NUM_THREADS=1 python benchmarks/decode.py --presets tiny --modes absorbed naive

Random weights, greedy decoding through `dsv3.generate.generate_tokens` (the loop `generate` and
`stream` use; no tokenizer, never stops early). Prefill = the prompt's one forward + the first token;
decode tokens/s = batch * (new_tokens - 1) / time of the remaining one-token forwards.
Timings on a shared CPU are noisy: run it twice and read the spread.
"""

from __future__ import annotations

import argparse
import time

import torch

import dsv3
from dsv3.generate import generate_tokens


def run(model, prompt, new_tokens: int, mode: str) -> tuple[float, float, float]:
    """(prefill seconds, decode seconds, decode CPU seconds of this process) of one greedy generation."""
    steps = generate_tokens(model, prompt, new_tokens, temperature=0, cache=mode)
    t0 = time.perf_counter()
    next(steps)
    t1, c1 = time.perf_counter(), time.process_time()
    n = 1 + sum(1 for _ in steps)
    t2, c2 = time.perf_counter(), time.process_time()
    assert n == new_tokens
    return t1 - t0, t2 - t1, c2 - c1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "174m"])
    ap.add_argument("--modes", nargs="+", default=["absorbed", "naive", "none"])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"prompt {args.prompt_len}, new tokens {args.new_tokens}, batch {args.batch}, greedy, random weights")
    # cpu s: CPU time this process got while decoding; far below decode s x threads means other load.
    # tok/cpu-s: decode tokens per CPU second, the steadier number on a shared machine (1 thread).
    print(f"{'preset':<8} {'cache':<9} {'prefill s':>9} {'decode s':>9} {'cpu s':>7} {'decode tok/s':>13} "
          f"{'tok/cpu-s':>10}")
    for name in args.presets:
        torch.manual_seed(0)
        with torch.device(args.device):
            model = dsv3.DeepSeekV3(dsv3.ModelConfig.preset(name)).eval()
        cfg = model.cfg
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len), generator=g)
        run(model, prompt, 4, "absorbed")  # warm-up: allocator, kernels, lazy init
        for mode in args.modes:
            prefill, decode, cpu = run(model, prompt, args.new_tokens, mode)
            rate = args.batch * (args.new_tokens - 1) / decode
            per_cpu = args.batch * (args.new_tokens - 1) / cpu
            print(f"{name:<8} {mode:<9} {prefill:>9.3f} {decode:>9.3f} {cpu:>7.2f} {rate:>13.1f} {per_cpu:>10.1f}",
                  flush=True)
        # bytes per token, measured from a real cache's tensors; MHA = the per-head K and V MLA avoids caching
        fp32 = model.new_cache(1, 1).bytes_per_token() if cfg.attn == "mla" else None
        bf16 = model.new_cache(1, 1, dtype=torch.bfloat16).bytes_per_token()
        mha = 2 * cfg.n_layers * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim)
        print(f"{name:<8} kv cache bytes/token: {bf16:,} (bf16), {fp32:,} (fp32); "
              f"an MHA cache of the same heads would be {mha:,} (bf16), {mha / bf16:.1f}x")
        del model


if __name__ == "__main__":
    main()
