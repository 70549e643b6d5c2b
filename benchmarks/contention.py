"""Two dsv3 processes on one CPU: tokens/s of each, alone and side by side, with and without the thread governor.

    python benchmarks/contention.py                  # ~3 minutes: tiny preset, 5 s warm-up, 10 s windows
    python benchmarks/contention.py --rounds 3 --policies old,default,threads1

Workers (subprocesses) train the tiny preset (batch 16 x 128, the CLI's default shape, random data, fused AdamW)
or generate with it (greedy, batch 1, absorbed cache, random weights). Each scenario builds every worker's model
first, then starts them together; after --warmup seconds each counts the tokens of the steps it finishes inside
the same --seconds window (a step still running at the end does not count: under one step per window reads 0).
The warm-up gives the governor time to react (its first window beside another job is a slow one).
Scenarios: train alone, generate alone, train + train, train + generate. Ratios are each worker's tokens/s beside
the other job / its tokens/s alone; "threads" is each worker's torch thread count at the end of the window.
Policies:
  old       torch's threads, libgomp's wait policy (spin ~3 ms), no governor (DSV3_ADAPTIVE_THREADS=0)
  default   what dsv3 does: the thread governor (dsv3/threads.py) halves the threads while the cores are shared
  passive   OMP_WAIT_POLICY=PASSIVE, no governor: waiting threads sleep at once
  threads1  one thread per process (torch.set_num_threads(1)), no governor
  spin10k   GOMP_SPINCOUNT=10000: spin ~0.1 ms before sleeping, no governor
Solo runs of the policies are interleaved, `--rounds` times each, so their ratio (solo speed kept) is fair.
The machine's other load shows up in every figure: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFF = {"DSV3_ADAPTIVE_THREADS": "0"}
POLICIES = {
    "old": dict(env=OFF, threads=None),
    "default": dict(env={}, threads=None),
    "passive": dict(env={**OFF, "OMP_WAIT_POLICY": "PASSIVE"}, threads=None),
    "threads1": dict(env=OFF, threads=1),
    "spin10k": dict(env={**OFF, "GOMP_SPINCOUNT": "10000"}, threads=None),
}


def worker(args) -> None:
    import torch

    import dsv3
    from dsv3.generate import generate_tokens
    from dsv3.threads import governor

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(dsv3.ModelConfig.preset("tiny"))
    if args.job == "train":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        x = torch.randint(0, model.cfg.vocab_size, (16, 129))
        gov = governor()  # as dsv3.train's loop does: begin() before the steps, tick() after each

        def step() -> int:
            model(x[:, :-1], x[:, 1:], return_logits=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if gov is not None:
                gov.tick()
            return x[:, 1:].numel()
    else:
        model.eval()
        prompt = torch.randint(0, model.cfg.vocab_size, (1, 16))
        tokens = iter(())

        def step() -> int:
            nonlocal tokens
            try:
                next(tokens)
            except StopIteration:  # a new generation every 128 tokens (its prefill counts as one step)
                tokens = generate_tokens(model, prompt, 128, temperature=0)  # (governed inside)
                next(tokens)
            return 1
    step()  # first-call allocations, then wait for the common start
    print("ready", flush=True)
    sys.stdin.readline()
    if args.job == "train" and gov is not None:
        gov.begin()  # (the first step ran ungoverned)
    while True:  # until the parent kills us at the end of the window
        n = step()
        print(time.time(), n, torch.get_num_threads(), flush=True)


def run_scenario(jobs: list[str], policy: str, args) -> tuple[list[float], list[int]]:
    """Each worker's tokens/s (tokens of the steps it finished inside the common window / the window), threads."""
    spec = POLICIES[policy]
    drop = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", "DSV3_ADAPTIVE_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(spec["env"], PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__]
    cmd += ["--threads", str(spec["threads"])] if spec["threads"] else []
    pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    procs = [subprocess.Popen([*cmd, "--worker", job], env=env, **pipes) for job in jobs]
    try:
        for p in procs:  # every model is built before any worker starts
            if p.stdout.readline().strip() != "ready":
                raise SystemExit(f"worker failed ({p.wait()})")
        lines: list[list[str]] = [[] for _ in procs]
        readers = [threading.Thread(target=lambda p=p, out=out: out.extend(p.stdout), daemon=True)
                   for p, out in zip(procs, lines, strict=True)]
        for r in readers:
            r.start()
        t0 = time.time()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        t_measure, t_end = t0 + args.warmup, t0 + args.warmup + args.seconds
        time.sleep(t_end - time.time())
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for r in readers:
        r.join(timeout=5)
    out, threads = [], []
    for rows in lines:
        cells = [line.split() for line in rows]  # (the kill may cut a last line short)
        done = [(float(t), int(n), int(k)) for t, n, k in (c for c in cells if len(c) == 3)]
        out.append(sum(n for t, n, _ in done if t_measure < t <= t_end) / args.seconds)
        threads.append(([k for t, _, k in done if t <= t_end] or [0])[-1])
    return out, threads


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--policies", default="old,default", help=f"comma-separated subset of {','.join(POLICIES)}")
    ap.add_argument("--seconds", type=float, default=10.0, help="measurement window per scenario")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds run before the window")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of the solo runs")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    ap.add_argument("--worker", choices=["train", "generate"], help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.job = args.worker
        return worker(args)
    policies = [p for p in args.policies.split(",") if p]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        ap.error(f"--policies: unknown {', '.join(unknown)}; choose from {', '.join(POLICIES)}")
    solo: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):  # interleaved: old, default, old, default, ...
        for job in ("train", "generate"):
            for pol in policies:
                solo.setdefault((pol, job), []).append(run_scenario([job], pol, args)[0][0])
    results = {}
    print(f"tiny preset, {args.seconds:g} s windows; tokens/s (ratio = beside the other job / alone)")
    print(f"{'policy':<10} {'scenario':<18} {'tokens/s':>20} {'ratio':>14} {'threads':>8}")
    for pol in policies:
        alone = {job: statistics.median(solo[(pol, job)]) for job in ("train", "generate")}
        results[pol] = {"alone": alone}
        for job in ("train", "generate"):
            print(f"{pol:<10} {job + ' alone':<18} {alone[job]:>20.0f} {'':>14}")
        for jobs in (["train", "train"], ["train", "generate"]):
            tps, threads = run_scenario(jobs, pol, args)
            ratios = [t / alone[j] if alone[j] else float("nan") for t, j in zip(tps, jobs, strict=True)]
            name = " + ".join(jobs)
            results[pol][name] = {"tokens_per_s": tps, "ratio": ratios, "threads": threads}
            print(f"{pol:<10} {name:<18} {' / '.join(f'{t:.0f}' for t in tps):>20} "
                  f"{' / '.join(f'{r:.1%}' for r in ratios):>14} {' / '.join(map(str, threads)):>8}")
    if len(policies) > 1 and "old" in policies:
        for pol in policies:
            if pol != "old":
                keep = {j: f"{results[pol]['alone'][j] / results['old']['alone'][j]:.2f}x"
                        if results["old"]["alone"][j] else "n/a (old measured 0)" for j in ("train", "generate")}
                print(f"solo speed, {pol} / old: train {keep['train']}, generate {keep['generate']} "
                      f"(median of {args.rounds} interleaved rounds)")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
