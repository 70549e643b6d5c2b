"""Multi-token prediction, measured: (a) draft acceptance on held-out text, (b) decoding tokens/s with and without
self-speculative decoding, (c) validation cross-entropy of the main head with and without MTP at the same budget;
and the cost curves that explain (b): (d) a T-position decoding step against T = 1, (e) the draft against K.

    # the tiny preset's default phase 1, with and without one MTP module, then the measurements:
    python -m dsv3 train --preset tiny --mtp-layers 1 --out runs/tiny-mtp1
    python -m dsv3 train --preset tiny --out runs/tiny-mtp0
    python benchmarks/mtp.py --mtp-run runs/tiny-mtp1 --plain-run runs/tiny-mtp0
    # or train both here, each for the same wall-clock budget (seconds), then measure:
    python benchmarks/mtp.py --train --time 480 --out runs/mtp-bench
    # smoke test (seconds): python benchmarks/mtp.py --train --time 20 --out /tmp/mtp-smoke --prompts 2 \
    #                           --new-tokens 16 --eval-batches 2 --no-compile
    # speculative speed for several drafts D and draft vocabularies K (0 = the full head):
    python benchmarks/mtp.py --mtp-run runs/tiny-mtp1 --drafts 1,2,3 --draft-vocabs 0,8192,2048
    # (d) and (e) alone, on random weights (also from an older tree: PYTHONPATH=OLD_TREE python benchmarks/mtp.py):
    python benchmarks/mtp.py --curves 174m [--positions 1,2,3,4] [--draft-vocabs 0,32768,16384,8192,4096]
    # (f) alone: what one MTP module adds to a training step
    python benchmarks/mtp.py --train-cost 174m [--batch 2,256] [--reps 5]

(a) greedy and sampled (temperature 0.8, top-k 50) speculative decoding of --prompts windows cut from the validation
    split: drafts accepted / drafts proposed, and tokens per main-model forward.
(b) batch 1, greedy, per prompt in turn: plain and speculative, eager and compiled (compile=True: the one-token
    steps, speculation's verifying steps and its MTP drafting steps run torch.compile'd static-shape blocks and
    head; the prompt stays eager): new tokens / wall seconds of the whole generate_tokens call (prefill included),
    median over prompts x --repeats. The modes alternate prompt by prompt, so load on a shared machine hits all.
(d) random weights of --curves PRESET, batch 1, cache position 128 of 256: ms per step of T new positions, eager
    and compiled (`DeepSeekV3.decode`; an older tree without it: the step it had, `decode_step` / `verify_compiled`
    compiled, the cached forward eager); the ratio to T = 1 is what verifying D = T - 1 drafts costs.
(e) the same model with one MTP module: ms of one MTP block step (D + 1 positions) and of the draft head over K rows
    (eager F.linear and the compiled head), against K.
(f) random weights and tokens of --train-cost PRESET: ms of one fp32 training step (forward with the losses,
    backward, AdamW) without and with one MTP module (its block and a second pass of the shared head).
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
import torch.nn.functional as F
from bench import interleaved

import dsv3
from dsv3.checkpoint import read_meta, resolve_checkpoint
from dsv3.data import load_tokens, split_tokens
from dsv3.generate import generate_tokens


def held_out_prompts(n: int, length: int, val_fraction: float) -> list[torch.Tensor]:
    """n windows of `length` tokens, evenly spaced over the validation split."""
    _, val = split_tokens(load_tokens(), val_fraction)
    starts = torch.linspace(0, len(val) - length - 1, n).long().tolist()
    return [torch.as_tensor(val[s:s + length], dtype=torch.long)[None] for s in starts]


def acceptance(model, prompts, new_tokens: int, **kw) -> dict:
    drafted = accepted = 0
    by_depth: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        drafts, depths = [], []
        ids = torch.stack(list(generate_tokens(model, p, new_tokens, speculative=True, drafts=drafts, seed=i,
                                               draft_depths=depths, **kw)), 1)
        d = torch.stack(drafts, 1)
        drafted += (d >= 0).sum().item()
        accepted += ((d >= 0) & (d == ids)).sum().item()
        for j, k in enumerate(depths):
            if k:
                by_depth.setdefault(k, [0, 0])
                by_depth[k][0] += int(d[0, j] == ids[0, j])
                by_depth[k][1] += 1
    tokens = len(prompts) * new_tokens
    return {"drafted": drafted, "accepted": accepted, "rate": accepted / max(1, drafted),
            "by_depth": {k: a / n for k, (a, n) in sorted(by_depth.items())},  # P(keep d_k | d_1..d_k-1 kept)
            # every main-model forward after the prefill decides accepted drafts + 1 tokens
            "tokens_per_forward": tokens / max(1, tokens - accepted)}


def timed(model, prompt, new_tokens: int, **kw) -> float:
    t0 = time.perf_counter()
    n = sum(1 for _ in generate_tokens(model, prompt, new_tokens, temperature=0, **kw))
    assert n == new_tokens
    return new_tokens / (time.perf_counter() - t0)


def speed(model, prompts, new_tokens: int, repeats: int, compile: bool, drafts=(None,), vocabs=(None,)) -> dict:
    modes = {"plain eager": {}}
    for d in drafts:
        for k in vocabs:
            modes[f"speculative eager D={d or model.cfg.n_mtp_layers} K={k}"] = \
                {"speculative": True, "n_drafts": d, "draft_vocab": k}
    if compile:
        for m in list(modes):
            modes[m.replace("eager", "compiled")] = {**modes[m], "compile": True}
    for kw in modes.values():  # warm-up (and the compile)
        timed(model, prompts[0], min(new_tokens, 8), **kw)
    rates = {m: [] for m in modes}
    for _ in range(repeats):
        for p in prompts:
            for m, kw in modes.items():
                rates[m].append(timed(model, p, new_tokens, **kw))
    return {m: statistics.median(r) for m, r in rates.items()}


def _ms(fn, reps: int) -> dict:
    """{name: median ms} of fns run interleaved."""
    res = interleaved(fn, reps=reps, warmup=1)
    return {n: round(r["median"] * 1e3, 3) for n, r in res.items()}


def step_costs(preset: str, positions, reps: int, calls: int = 8) -> dict:
    """(d): ms per decoding step of T positions, batch 1, random weights, at cache position 128 of 256; where the
    kernels compute few-row products their own way (kernels/linear.py), also "xWt": the same step with every
    few-row product as torch's x W^T."""
    import dsv3.kernels.linear as kernels_linear
    from dsv3.kernels.decode import graphs_allowed

    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(dsv3.ModelConfig.preset(preset)).eval()
    cache = model.new_cache(1, 256)
    fns = {}
    for T in positions:
        toks = torch.zeros(1, T, dtype=torch.long)
        for compiled in (False, True):
            if hasattr(model, "decode"):  # one static step
                def step(toks=toks, compiled=compiled):
                    model.decode(toks, cache, compiled=compiled)
            elif compiled:  # an older tree: decode_step for one position, verify_compiled for more
                from dsv3.speculative import verify_compiled

                def step(toks=toks, T=T):
                    model.decode_step(toks, cache, compiled=True) if T == 1 else verify_compiled(model, toks, cache)
            else:
                def step(toks=toks):
                    model(toks, cache=cache, last_logits=False)

            def run(step=step, xwt=False):
                few = getattr(kernels_linear, "FEW_ROWS", None)
                if xwt:  # every few-row product as torch's x W^T (FEW_ROWS = 0), for comparison
                    kernels_linear.FEW_ROWS = 0
                try:
                    for _ in range(calls):
                        cache.pos = 128
                        step()
                finally:
                    if few is not None:
                        kernels_linear.FEW_ROWS = few
            name = f"T={T} {'compiled' if compiled else 'eager'}"
            fns[name] = run
            if (T > 1 or compiled) and hasattr(kernels_linear, "FEW_ROWS"):
                fns[f"{name} xWt"] = lambda run=run: run(xwt=True)
    with torch.inference_mode(), graphs_allowed():
        ms = _ms(fns, reps)
    return {n: round(v / calls, 3) for n, v in ms.items()}


def draft_costs(preset: str, vocabs, widths, reps: int, calls: int = 8) -> dict:
    """(e): ms of one MTP block step over W = D + 1 positions, and of the draft head over K rows (batch 1)."""
    from dsv3.kernels.decode import compiled_head, compiled_step, graphs_allowed
    from dsv3.model import static_step
    from dsv3.speculative import draft_head

    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(dsv3.ModelConfig.preset(preset, n_mtp_layers=1)).eval()
    cfg, mkv = model.cfg, model.new_cache(1, 256)
    fns = {}
    for W in widths:
        pos = torch.arange(128, 128 + W)
        h, emb = torch.randn(1, W, cfg.dim), torch.randn(1, W, cfg.dim)
        cos, sin = model.rope_cos[pos], model.rope_sin[pos]
        mkv.pos = 128
        mask = mkv.mask(W, whole_cache=True)
        for name, step in (("eager", static_step), ("compiled", compiled_step(static_step, "cpu"))):
            fns[f"mtp block W={W} {name}"] = lambda step=step, a=(h, emb, cos, sin), pos=pos, mask=mask: [
                step(model.mtp[0], a, mkv.slots(0, pos), mask) for _ in range(calls)]
    x = torch.randn(1, 1, cfg.dim)
    with torch.inference_mode(), graphs_allowed():
        for K in vocabs:
            w = draft_head(model, K)[1]
            fns[f"head K={K or cfg.vocab_size} eager"] = lambda w=w: [F.linear(x, w) for _ in range(calls)]
            fns[f"head K={K or cfg.vocab_size} compiled"] = lambda w=w: [compiled_head("cpu")(x, w)
                                                                         for _ in range(calls)]
        ms = _ms(fns, reps)
    return {n: round(v / calls, 3) for n, v in ms.items()}


def train_step_costs(preset: str, mtp_layers, batch: int, seq: int, reps: int) -> dict:
    """(f): ms of one training step (forward with the losses, backward, AdamW) of `preset` with each number of MTP
    modules, random weights and tokens, fp32, the same weights for the trunk; interleaved."""
    fns = {}
    for D in mtp_layers:
        torch.manual_seed(0)
        model = dsv3.DeepSeekV3(dsv3.ModelConfig.preset(preset, n_mtp_layers=D))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, model.cfg.vocab_size, (batch, seq))

        def step(model=model, opt=opt, x=x):
            model(x, x.roll(-1, 1), return_logits=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        fns[f"train step D={D}"] = step
    return _ms(fns, reps)


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
    ap.add_argument("--drafts", default="", help="(b): drafts per round to time, e.g. 1,2,3 (default: the model's)")
    ap.add_argument("--draft-vocabs", default="", help="(b), (e): draft vocabularies K, e.g. 0,8192 (0 = full head)")
    ap.add_argument("--curves", metavar="PRESET", help="only (d) and (e), on random weights of this preset")
    ap.add_argument("--positions", default="1,2,3,4", help="(d): positions per step")
    ap.add_argument("--no-draft-curve", dest="draft_curve", action="store_false", help="(d) only")
    ap.add_argument("--reps", type=int, default=5, help="(d), (e), (f): interleaved repetitions")
    ap.add_argument("--train-cost", metavar="PRESET", help="only (f): a training step with 0 and 1 MTP modules")
    ap.add_argument("--batch", default="2,256", help="(f): batch size, sequence length")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ints = lambda s: [int(v) for v in s.split(",") if v.strip()]  # noqa: E731
    if args.train_cost:
        ms = train_step_costs(args.train_cost, [0, 1], *ints(args.batch), args.reps)
        print(f"(f) {args.train_cost}: ms per training step, batch {args.batch}, fp32", flush=True)
        for n, v in ms.items():
            print(f"    {n:<16} {v:9.1f} ms  ({v / ms['train step D=0']:.2f}x D=0)", flush=True)
        print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "train_ms": ms}))
        return
    if args.curves:
        out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "preset": args.curves,
               "step_ms": step_costs(args.curves, ints(args.positions), args.reps)}
        print(f"(d) {args.curves}: ms per decoding step of T positions", flush=True)
        for n, v in out["step_ms"].items():
            base = out["step_ms"][f"T=1 {n.split()[1]}"]
            print(f"    {n:<16} {v:8.2f} ms  ({v / base:.2f}x T=1)", flush=True)
        if args.draft_curve:
            out["draft_ms"] = draft_costs(args.curves, ints(args.draft_vocabs) or [0, 32768, 16384, 8192, 4096],
                                          [t for t in ints(args.positions) if t > 1], args.reps)
            print(f"(e) {args.curves}: ms of the draft's parts", flush=True)
            for n, v in out["draft_ms"].items():
                print(f"    {n:<26} {v:8.3f} ms", flush=True)
        print(json.dumps(out))
        return
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
    for d in ints(args.drafts) or [None]:
        for k in ints(args.draft_vocabs) or [None]:
            for name, sampling in (("greedy", dict(temperature=0)), ("T=0.8 top-k 50", dict(temperature=0.8,
                                                                                           top_k=50))):
                a = acceptance(model, prompts, args.new_tokens, n_drafts=d, draft_vocab=k, **sampling)
                key = f"{name} D={d or model.cfg.n_mtp_layers} K={k}"
                results["acceptance"][key] = a
                print(f"    {key:<30} {a['accepted']:>5} of {a['drafted']:>5} drafts accepted = {a['rate']:.1%}, "
                      f"by depth {[round(v, 3) for v in a['by_depth'].values()]}, "
                      f"{a['tokens_per_forward']:.2f} tokens per main-model forward", flush=True)

    print(f"(b) decoding tokens/s, batch 1, greedy, median of {args.prompts} prompts x {args.repeats} "
          "(interleaved)", flush=True)
    drafts, vocabs = ints(args.drafts) or [None], ints(args.draft_vocabs) or [None]
    s = speed(model, prompts, args.new_tokens, args.repeats, args.compile, drafts, vocabs)
    results["tokens_per_s"] = s
    for m, r in s.items():
        base = s["plain compiled" if "compiled" in m else "plain eager"]
        print(f"    {m:<36} {r:>8.1f} tokens/s  ({r / base:.2f}x plain {m.split()[1]})")

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
