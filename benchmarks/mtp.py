"""Multi-token prediction, measured: (a) draft acceptance on held-out text, (b) decoding tokens/s with and without
self-speculative decoding, (c) validation cross-entropy of the main head with and without MTP at the same budget.

    # the tiny preset's default phase 1, with and without one MTP module, then the measurements:
    python -m dsv3 train --preset tiny --mtp-layers 1 --out runs/tiny-mtp1
    python -m dsv3 train --preset tiny --out runs/tiny-mtp0
    python benchmarks/mtp.py --mtp-run runs/tiny-mtp1 --plain-run runs/tiny-mtp0
    # or train both here, each for the same wall-clock budget (seconds), then measure:
    python benchmarks/mtp.py --train --time 480 --out runs/mtp-bench
    # smoke test (seconds): python benchmarks/mtp.py --train --time 20 --out /tmp/mtp-smoke --prompts 2 \
    #                           --new-tokens 16 --eval-batches 2 --no-compile

(a) greedy and sampled (temperature 0.8, top-k 50) speculative decoding of --prompts windows cut from the validation
    split: drafts accepted / drafts proposed, and tokens per main-model forward.
(b) batch 1, greedy, per prompt in turn: plain and speculative, eager and compiled (compile=True: the one-token
    steps, and speculation's verifying forwards, run torch.compile'd static-shape blocks; the MTP block and the
    prompt stay eager): new tokens / wall seconds of the whole generate_tokens call (prefill included), median
    over prompts x --repeats. The modes alternate prompt by prompt, so load on a shared machine hits all.
(c) both runs' last checkpoints on the same validation windows (`dsv3.evaluate`: the main head's CE), next to the
    steps and seconds each run trained. With --train both runs get the same --time budget; the MTP run's steps
    cost more (one more block and head), so it trains fewer of them.
Offline: DSV3_CORPUS and TIKTOKEN_CACHE_DIR point at the shared copies. Timings need a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import dsv3
from dsv3.checkpoint import read_meta, resolve_checkpoint
from dsv3.data import load_tokens, split_tokens
from dsv3.generate import generate_tokens


def held_out_prompts(n: int, length: int, val_fraction: float) -> list[torch.Tensor]:
    """n windows of `length` tokens, evenly spaced over the validation split."""
    _, val = split_tokens(load_tokens(), val_fraction)
    starts = torch.linspace(0, len(val) - length - 1, n).long().tolist()
    return [torch.as_tensor(val[s:s + length], dtype=torch.long)[None] for s in starts]


def acceptance(model, prompts, new_tokens: int, **sampling) -> dict:
    drafted = accepted = 0
    for i, p in enumerate(prompts):
        drafts = []
        ids = torch.stack(list(generate_tokens(model, p, new_tokens, speculative=True, drafts=drafts, seed=i,
                                               **sampling)), 1)
        d = torch.stack(drafts, 1)
        drafted += (d >= 0).sum().item()
        accepted += ((d >= 0) & (d == ids)).sum().item()
    tokens = len(prompts) * new_tokens
    return {"drafted": drafted, "accepted": accepted, "rate": accepted / max(1, drafted),
            # every main-model forward after the prefill decides accepted drafts + 1 tokens
            "tokens_per_forward": tokens / max(1, tokens - accepted)}


def timed(model, prompt, new_tokens: int, **kw) -> float:
    t0 = time.perf_counter()
    n = sum(1 for _ in generate_tokens(model, prompt, new_tokens, temperature=0, **kw))
    assert n == new_tokens
    return new_tokens / (time.perf_counter() - t0)


def speed(model, prompts, new_tokens: int, repeats: int, compile: bool) -> dict:
    modes = {"plain eager": {}, "speculative eager": {"speculative": True}}
    if compile:
        modes["plain compiled"] = {"compile": True}
        modes["speculative compiled"] = {"compile": True, "speculative": True}
    for kw in modes.values():  # warm-up (and the compile)
        timed(model, prompts[0], min(new_tokens, 8), **kw)
    rates = {m: [] for m in modes}
    for _ in range(repeats):
        for p in prompts:
            for m, kw in modes.items():
                rates[m].append(timed(model, p, new_tokens, **kw))
    return {m: statistics.median(r) for m, r in rates.items()}


def train_runs(out: Path, seconds: float, threads: int | None, eval_batches: int | None) -> tuple[Path, Path]:
    runs = []
    for d in (1, 0):
        folder = out / f"tiny-mtp{d}"
        dsv3.train(preset="tiny", model_overrides={"n_mtp_layers": d} if d else {}, time_limit=seconds,
                   out=str(folder), overwrite=True, threads=threads, eval_batches=eval_batches)
        runs.append(folder)
    return runs[0], runs[1]


def run_summary(run: Path) -> dict:
    ckpt = resolve_checkpoint(run)
    h = dsv3.History.from_jsonl(ckpt.parent / "metrics.jsonl")
    return {"checkpoint": str(ckpt), "steps": h.train[-1]["step"], "train_seconds": round(h.train[-1]["elapsed"], 1),
            "val_fraction": read_meta(ckpt)["train_config"]["val_fraction"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mtp-run", type=Path, help="a run folder (or checkpoint) trained with --mtp-layers 1")
    ap.add_argument("--plain-run", type=Path, help="the same preset trained without MTP")
    ap.add_argument("--train", action="store_true", help="train both runs here first (the tiny preset)")
    ap.add_argument("--time", type=float, default=480.0, help="with --train: seconds of training per run")
    ap.add_argument("--out", type=Path, default=Path("runs/mtp-bench"), help="with --train: where the runs go")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--eval-batches", type=int, default=None, help="validation batches for (c) (default: all)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled decoding mode")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train:
        args.mtp_run, args.plain_run = train_runs(args.out, args.time, args.threads, args.eval_batches)
    if args.mtp_run is None:
        ap.error("give --mtp-run (and --plain-run), or --train")
    results = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    mtp_info = run_summary(args.mtp_run)
    model = dsv3.load_checkpoint(mtp_info["checkpoint"]).eval()
    if model.cfg.n_mtp_layers == 0:
        raise SystemExit(f"--mtp-run {args.mtp_run}: this model has no MTP modules (train with --mtp-layers 1)")
    prompts = held_out_prompts(args.prompts, args.prompt_len, mtp_info["val_fraction"])

    print(f"(a) draft acceptance, {args.prompts} held-out prompts of {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens each, D = {model.cfg.n_mtp_layers}", flush=True)
    results["acceptance"] = {}
    for name, sampling in (("greedy", dict(temperature=0)), ("T=0.8 top-k 50", dict(temperature=0.8, top_k=50))):
        a = acceptance(model, prompts, args.new_tokens, **sampling)
        results["acceptance"][name] = a
        print(f"    {name:<15} {a['accepted']:>5} of {a['drafted']:>5} drafts accepted = {a['rate']:.1%}, "
              f"{a['tokens_per_forward']:.2f} tokens per main-model forward", flush=True)

    print(f"(b) decoding tokens/s, batch 1, greedy, median of {args.prompts} prompts x {args.repeats} "
          "(interleaved)", flush=True)
    s = speed(model, prompts, args.new_tokens, args.repeats, args.compile)
    results["tokens_per_s"] = s
    for m, r in s.items():
        base = s["plain compiled" if "compiled" in m else "plain eager"]
        print(f"    {m:<20} {r:>8.1f} tokens/s  ({r / base:.2f}x plain {m.split()[1]})")

    if args.plain_run is not None:
        print("(c) validation cross-entropy of the main head (the same validation windows)", flush=True)
        _, val = split_tokens(load_tokens(), mtp_info["val_fraction"])
        results["validation"] = {}
        for name, run in (("with MTP", args.mtp_run), ("without MTP", args.plain_run)):
            info = run_summary(run)
            m = dsv3.load_checkpoint(info["checkpoint"])
            ce, _ = dsv3.evaluate(m, val, 16, 128, args.eval_batches)
            results["validation"][name] = {**info, "val_ce": ce}
            print(f"    {name:<12} val CE {ce:.4f} after {info['steps']} steps, {info['train_seconds']} s of training")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
