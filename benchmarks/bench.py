"""Benchmark: `python -m dsv3 bench [--json] [--quick]` measures, in one process, interleaved:

  matmul   -- the machine's peak: large square GEMMs and the model's own GEMM shapes, fp32 and bf16
  train    -- training-step tokens/s, achieved FLOP/s and fraction of peak for `tiny` and `174m`, fp32 and
              bf16 autocast, dsv3 with its kernels on and off ("reference"), side by side with transformers'
              DeepseekV3ForCausalLM holding the same weights (on the CPU the peak is the faster of `matmul`'s
              and a square GEMM timed between the steps)
  dispatch -- MoE sorted, grouped dispatch (the kernel) vs the reference loop over experts (174m layer shape)
  decode   -- greedy decoding (batch 1, prompt 32, 128 new): absorbed latent cache (eager, with the step
              compiled, and with the kernels off), naive latent cache, no cache, transformers `generate`;
              tokens/s, cache bytes per token per layer, fraction of the memory-bandwidth floor (active weight
              bytes per token / measured bandwidth)
  memory   -- peak RSS of a process running 174m training steps (one subprocess per variant)

Interleaving: each repetition runs every variant once (in a rotating order) so machine drift hits all
of them alike; we report medians after warm-up and the spread (max/min - 1) as the noise.
FLOPs per training token = 6 x active params + attention 6 x n_layers x n_heads x T x (d_qk + d_v)
(PaLM's convention: full T x T scores, no causal halving).
Benchmarks use score_func="sigmoid" (DeepSeek-V3's router) so the transformers twin is DeepseekV3ForCausalLM;
its weights come from `dsv3.export_hf` (same numbers, so both models do the same work).
Deliberately not here: the training loop, sampling strategies, plotting styles beyond one figure.
`transformers` is optional: without it the HF columns are skipped.
Lab code, not the package: `python -m dsv3 bench` loads this file from the source checkout (`pip install -e .`);
the scripts beside it import `interleaved` from it (`from bench import interleaved`).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from dsv3 import kernels
from dsv3.config import ModelConfig
from dsv3.model import DeepSeekV3, count_params
from dsv3.moe import MoE

HERE = os.path.dirname(os.path.abspath(__file__))  # benchmarks/: the memory section's subprocesses import from it
H200_BF16_PEAK = 790e12  # dense bf16 FLOP/s the issue measures GPU MFU against
TRAIN_SHAPES = {"tiny": (4, 256), "174m": (2, 256)}  # batch x seq for a 2-core CPU
PROBE_N = 2048  # the square GEMM timed between training steps (CPU): the peak is the faster of it and `matmul`
BENCH_OVERRIDES = dict(score_func="sigmoid", route_scale=1.0)  # DeepSeek-V3 routing -> HF DeepseekV3


# --- machine and timing -------------------------------------------------------------------------------
def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "logical_cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    try:
        first_cpu = open("/proc/cpuinfo").read().split("\n\n")[0]  # every logical CPU repeats the same block
        pairs = (line.split(":", 1) for line in first_cpu.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in pairs}
        flags = set(fields["flags"].split())
        # a VM's model name can be as bare as "AMD EPYC": family and model tell the generation (AMD 26: Zen 5)
        info.update(cpu=fields["model name"], cpu_family=fields.get("cpu family"), cpu_model=fields.get("model"),
                    amx="amx_bf16" in flags, avx512_bf16="avx512_bf16" in flags, avx512="avx512f" in flags)
    except (OSError, KeyError):
        pass
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, reps: int, warmup: int = 1, device: str = "cpu", cap: dict | None = None) -> dict:
    """Run each fn `warmup` times, then `reps` rounds of all fns in a rotating order (fn `n` at most
    cap[n] times: for slow reference variants).

    Returns {name: {"median": s, "spread": max/min - 1, "times": [...]}}."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[: r % len(names)]:
            if len(times[n]) >= (cap or {}).get(n, reps):
                continue
            _sync(device)
            t0 = time.perf_counter()
            fns[n]()
            _sync(device)
            times[n].append(time.perf_counter() - t0)
    return {n: {"median": statistics.median(t), "spread": max(t) / min(t) - 1, "times": t} for n, t in times.items()}


# --- FLOP formulas ------------------------------------------------------------------------------------
def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward + backward FLOPs of the score and value matmuls per token (6 x L x H x T x (d_qk + d_v))."""
    if cfg.attn == "mla":
        d_qk, d_v = cfg.qk_head_dim, cfg.v_head_dim
    else:
        d_qk = d_v = cfg.head_dim
    return 6 * cfg.n_layers * cfg.n_heads * seq_len * (d_qk + d_v)


def train_flops_per_token(cfg: ModelConfig, active_params: int, seq_len: int) -> int:
    """6 N_active (forward 2N + backward 4N) plus attention."""
    return 6 * active_params + attention_flops_per_token(cfg, seq_len)


def gemm_shapes(cfg: ModelConfig, tokens: int) -> dict[str, tuple[int, int, int]]:
    """(m, k, n) of the model's forward GEMMs for `tokens` rows; routed experts get tokens * k / N rows."""
    routed = max(1, tokens * cfg.n_activated_experts // cfg.n_routed_experts)
    qk = cfg.n_heads * cfg.qk_head_dim
    return {
        "wq": (tokens, cfg.dim, qk),
        "wkv_a": (tokens, cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
        "wkv_b": (tokens, cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
        "wo": (tokens, cfg.n_heads * cfg.v_head_dim, cfg.dim),
        "expert_w1": (routed, cfg.dim, cfg.moe_inter_dim),
        "expert_w2": (routed, cfg.moe_inter_dim, cfg.dim),
        "head": (tokens, cfg.dim, cfg.vocab_size),
    }


# --- 1. matmul peak -----------------------------------------------------------------------------------
def bench_matmul(quick: bool, device: str = "cpu") -> dict:
    n = 1024 if quick else 2048
    if device == "cuda":
        n = 8192
    shapes = {f"square{n}": (n, n, n), **gemm_shapes(ModelConfig.preset("174m"), 512)}
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        fns, flops = {}, {}
        for name, (m, k, nn_) in shapes.items():
            a = torch.randn(m, k, device=device, dtype=dtype)
            b = torch.randn(k, nn_, device=device, dtype=dtype)
            fns[name] = lambda a=a, b=b: torch.mm(a, b)
            flops[name] = 2 * m * k * nn_
        res = interleaved(fns, reps=3 if quick else 5, device=device)
        key = str(dtype).removeprefix("torch.")
        # a peak is the fastest repetition (on a shared machine the median measures the neighbours too)
        out[key] = {name: {"shape": shapes[name], "gflops": flops[name] / min(r["times"]) / 1e9,
                           "gflops_median": flops[name] / r["median"] / 1e9, "spread": r["spread"]}
                    for name, r in res.items()}
        out[f"peak_{key}_gflops"] = max(v["gflops"] for v in out[key].values())
    return out


def bench_bandwidth(device: str = "cpu") -> float:
    """GB/s of a large copy (read + write), the floor for weight-streaming decode."""
    src = torch.randn(64 * 2**20, device=device)  # 256 MB
    dst = torch.empty_like(src)
    res = interleaved({"copy": lambda: dst.copy_(src)}, reps=5, device=device)
    return 2 * src.numel() * 4 / min(res["copy"]["times"]) / 1e9  # the fastest repetition, as for matmul peaks


# --- models -------------------------------------------------------------------------------------------
def bench_config(preset: str) -> ModelConfig:
    return ModelConfig.preset(preset, **BENCH_OVERRIDES)


def build_pair(preset: str, hf: bool, device: str = "cpu"):
    """Our model and (optionally) transformers' twin loaded with the same weights via dsv3.export_hf.
    A transformers version that cannot load the export (another machine's install) gives no twin and a
    message on stderr rather than losing dsv3's own figures."""
    torch.manual_seed(0)
    ours = DeepSeekV3(bench_config(preset)).to(device)
    if not hf:
        return ours, None
    import transformers  # run() has already turned hf off where transformers is missing

    from dsv3.export_hf import export_hf
    try:
        with tempfile.TemporaryDirectory() as d:
            export_hf(ours, d)
            theirs = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 -- reported, and the benchmark goes on without the twin
        print(f"bench: transformers {transformers.__version__} could not load the exported {preset} model "
              f"({type(e).__name__}: {e}); timing dsv3 alone", file=sys.stderr)
        return ours, None
    return ours, theirs.to(device)


def _hf_loss(model, x, y):
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def make_step(model, x, y, precision: str, hf: bool = False, compile: bool = False, reference: bool = False):
    """One optimizer step (forward, backward, AdamW) as a closure; both models use the same fused AdamW.
    Ours computes the loss with return_logits=False, as the trainer does; reference=True runs it with the
    kernels off (`dsv3.kernels.disabled()`): the plain PyTorch model."""
    if compile:  # a copy with its blocks compiled (regional, as the trainer does); the eager original stays eager
        model = copy.deepcopy(model)
        model.compile_blocks()
    model.train()
    device = x.device.type
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    amp = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    switch = kernels.disabled if reference else nullcontext
    loss_fn = (lambda: _hf_loss(model, x, y)) if hf else (lambda: model(x, y, return_logits=False).loss)

    def step():
        with switch():
            with amp:
                loss = loss_fn()
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not hf:
            model.update_router_bias()
        return loss

    return step


# --- 2/3. training step -------------------------------------------------------------------------------
def bench_train(presets, precisions, hf: bool, reps: int, peaks: dict, device: str = "cpu",
                compile: bool = False, shapes: dict | None = None, reference: bool = True) -> dict:
    """Training steps of dsv3 (kernels on), its reference (kernels off) and transformers' twin, interleaved."""
    out = {}
    for preset in presets:
        B, T = (shapes or TRAIN_SHAPES)[preset]
        ours, theirs = build_pair(preset, hf, device)
        cfg = ours.cfg
        active = count_params(ours)["active"]
        fpt = train_flops_per_token(cfg, active, T)
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(device)
        y = torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(device)
        diff = None
        if theirs is not None:  # the twin computes the same function: same weights, same logits (before training)
            with torch.no_grad():
                diff = (ours.eval()(x[:1, :16]).logits - theirs.eval()(input_ids=x[:1, :16]).logits).abs().max().item()
        fns = {}
        for prec in precisions:
            fns[f"dsv3/{prec}"] = make_step(ours, x, y, prec)
            if reference:
                fns[f"reference/{prec}"] = make_step(ours, x, y, prec, reference=True)
            if compile:
                fns[f"dsv3+compile/{prec}"] = make_step(ours, x, y, prec, compile=True)
            if theirs is not None:
                fns[f"hf/{prec}"] = make_step(theirs, x, y, prec, hf=True)
            if device == "cpu":  # the peak probe: a square GEMM between the steps, as the machine runs now
                a = torch.randn(PROBE_N, PROBE_N, dtype=torch.bfloat16 if prec == "bf16" else torch.float32)
                fns[f"probe/{prec}"] = lambda a=a: torch.mm(a, a)
        # compile (and CUDA's first kernels, handles and allocations) happen in the warm-up
        res = interleaved(fns, reps=reps, warmup=2 if compile or device == "cuda" else 1, device=device)
        row = {"batch": B, "seq_len": T, "active_params": active, "flops_per_token": fpt,
               "hf_max_abs_logit_diff": diff, "probe_gflops": {}, "peak_gflops": {}, "variants": {}}
        for prec in precisions:
            peak = peaks.get("peak_bfloat16_gflops" if prec == "bf16" else "peak_float32_gflops")
            if f"probe/{prec}" in res:  # on a VM whose speed drifts, the matmul section alone can be a slow moment
                probe = row["probe_gflops"][prec] = 2 * PROBE_N ** 3 / min(res.pop(f"probe/{prec}")["times"]) / 1e9
                peak = max(peak or 0.0, probe)
            if device == "cuda" and prec == "bf16":
                peak = H200_BF16_PEAK / 1e9  # MFU against the H200's dense bf16 peak, as the issue asks
            row["peak_gflops"][prec] = peak
        for name, r in res.items():
            prec = name.split("/")[1]
            tps = B * T / r["median"]
            peak = row["peak_gflops"][prec]
            achieved = tps * fpt / 1e9
            row["variants"][name] = {"step_s": r["median"], "tokens_per_s": tps, "gflops": achieved,
                                     "fraction_of_peak": achieved / peak if peak else None, "spread": r["spread"]}
        v = row["variants"]
        for name in [n for n in v if n.startswith(("dsv3", "reference"))]:  # eager, compiled, reference
            prec = name.split("/")[1]
            if f"hf/{prec}" in v:
                v[name]["vs_hf"] = v[name]["tokens_per_s"] / v[f"hf/{prec}"]["tokens_per_s"]
            if "hf/fp32" in v:
                v[name]["vs_hf_fp32"] = v[name]["tokens_per_s"] / v["hf/fp32"]["tokens_per_s"]
        out[preset] = row
        del ours, theirs, fns
        gc.collect()
    return out


# --- 4. MoE dispatch ----------------------------------------------------------------------------------
def bench_dispatch(reps: int, tokens: int = 512) -> dict:
    cfg = bench_config("174m")
    torch.manual_seed(0)
    m = MoE(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(tokens, cfg.dim, requires_grad=True)

    def grouped():
        m(x.unsqueeze(0))[0].sum().backward()

    def naive():  # the reference: one expert at a time, on the tokens that chose it
        with kernels.disabled():
            m(x.unsqueeze(0))[0].sum().backward()

    res = interleaved({"grouped": grouped, "naive": naive}, reps=reps)
    with torch.no_grad():
        y = m(x.unsqueeze(0))[0]
        with kernels.disabled():
            diff = (y - m(x.unsqueeze(0))[0]).abs().max().item()
    return {"tokens": tokens, "dim": cfg.dim, "experts": cfg.n_routed_experts, "top_k": cfg.n_activated_experts,
            "inter_dim": cfg.moe_inter_dim, "grouped_ms": 1e3 * res["grouped"]["median"],
            "naive_ms": 1e3 * res["naive"]["median"], "speedup": res["naive"]["median"] / res["grouped"]["median"],
            "max_abs_diff": diff, "spread": max(r["spread"] for r in res.values())}


# --- 5. decoding --------------------------------------------------------------------------------------
@torch.no_grad()
def greedy(model: DeepSeekV3, prompt: torch.Tensor, new: int, mode: str) -> torch.Tensor:
    """Greedy decoding with the latent cache (mode 'absorbed' / 'naive'; 'absorbed+compile': the one-token steps by
    `decode_step(compiled=True)`) or recomputing everything ('none')."""
    model.eval()
    seq = prompt
    if mode == "none":
        for _ in range(new):
            nxt = model(seq, last_logits=True).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        return seq
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + new, absorb=mode != "naive")
    logits = model(prompt, cache=cache, last_logits=True).logits[:, -1]
    out = [prompt]
    for _ in range(new):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        if mode == "absorbed+compile":
            logits = model.decode_step(nxt, cache, compiled=True)
        else:
            logits = model(nxt, cache=cache, last_logits=True).logits[:, -1]
    return torch.cat(out, dim=1)


def _hf_cache_bytes_per_token_layer(theirs, prompt, new: int) -> int | None:
    """Bytes transformers' decode cache holds per token per layer (measured from its tensors)."""
    out = theirs.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          return_dict_in_generate=True, pad_token_id=0)
    cache = out.past_key_values
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    if not total:
        return None
    return total // (len(cache.layers) * prompt.shape[0] * (prompt.shape[1] + new - 1))


def bench_decode(presets, hf: bool, reps: int, bandwidth_gbs: float, prompt_len: int = 32, new: int = 128,
                 no_cache_reps: int = 1, reference: bool = True) -> dict:
    out = {}
    for preset in presets:
        out[preset] = _decode_preset(preset, hf, reps, bandwidth_gbs, prompt_len, new, no_cache_reps, reference)
        gc.collect()
    return out


def _decode_preset(preset, hf, reps, bandwidth_gbs, prompt_len, new, no_cache_reps, reference=True) -> dict:
    ours, theirs = build_pair(preset, hf)
    cfg = ours.cfg
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(2))
    fns = {m: (lambda m=m: greedy(ours, prompt, new, m)) for m in ("absorbed", "absorbed+compile", "naive")}

    def reference_greedy():  # absorbed cache, kernels off
        with kernels.disabled():
            return greedy(ours, prompt, new, "absorbed")

    if reference:
        fns["reference"] = reference_greedy
    if no_cache_reps:
        fns["no_cache"] = lambda: greedy(ours, prompt, new, "none")
    if theirs is not None:
        theirs.eval()
        fns["hf_generate"] = lambda: theirs.generate(prompt, max_new_tokens=new, min_new_tokens=new,
                                                     do_sample=False, pad_token_id=0)
    with torch.no_grad():  # same greedy tokens (this also warms every path up)
        ref = greedy(ours, prompt, new, "absorbed")
        t = time.perf_counter()  # the first compiled run includes compiling (or loading inductor's disk cache)
        same = {"absorbed+compile": torch.equal(ref, greedy(ours, prompt, new, "absorbed+compile"))}
        first_compiled_s = time.perf_counter() - t
        same["naive"] = torch.equal(ref, greedy(ours, prompt, new, "naive"))
        if reference:
            same["reference"] = torch.equal(ref, reference_greedy())
        if theirs is not None:
            same["hf_generate"] = torch.equal(ref, fns["hf_generate"]())
    res = interleaved(fns, reps=reps, warmup=0, cap={"no_cache": no_cache_reps})
    active = count_params(ours)["active"]
    floor = bandwidth_gbs * 1e9 / (active * ours.embed.weight.element_size())
    per_layer = cfg.cache_values_per_token * ours.embed.weight.element_size()
    cache_bytes = {"absorbed": per_layer, "absorbed+compile": per_layer, "naive": per_layer, "reference": per_layer,
                   "no_cache": 0}
    if theirs is not None:
        with torch.no_grad():
            cache_bytes["hf_generate"] = _hf_cache_bytes_per_token_layer(theirs, prompt, new)
    row = {"prompt": prompt_len, "new_tokens": new, "batch": 1, "active_params": active,
           "first_compiled_run_s": first_compiled_s,
           "bandwidth_floor_tokens_per_s": floor, "same_tokens_as_absorbed": same, "methods": {}}
    for name, r in res.items():
        tps = new / r["median"]
        row["methods"][name] = {"tokens_per_s": tps, "fraction_of_floor": tps / floor, "spread": r["spread"],
                                "cache_bytes_per_token_per_layer": cache_bytes.get(name)}
    base = row["methods"].get("hf_generate")
    for v in row["methods"].values():
        if base:
            v["vs_hf"] = v["tokens_per_s"] / base["tokens_per_s"]
    return row


# --- peak memory (one subprocess per variant: RSS high-water marks are per process) --------------------
def _vm_hwm_mb() -> float:
    """This process's peak RSS (VmHWM: reset at exec, unlike ru_maxrss, which inherits the parent's)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def _memory_child(preset: str, precision: str, impl: str, steps: int = 2) -> None:
    B, T = TRAIN_SHAPES[preset]
    ours, theirs = build_pair(preset, impl == "hf")
    model = theirs if impl == "hf" else ours
    if impl == "hf":
        del ours
    gc.collect()
    base = _vm_hwm_mb()
    x = torch.randint(0, model.config.vocab_size if impl == "hf" else model.cfg.vocab_size, (B, T))
    step = make_step(model, x, x.roll(-1, 1), precision, hf=impl == "hf")
    for _ in range(steps):
        step()
    print(json.dumps({"peak_rss_mb": _vm_hwm_mb(), "model_rss_mb": base}))


def bench_memory(variants) -> dict:
    out = {}
    for preset, prec, impl in variants:
        code = (f"import sys, torch; torch.set_num_threads({torch.get_num_threads()}); sys.path.insert(0, {HERE!r}); "
                f"from bench import _memory_child; _memory_child({preset!r}, {prec!r}, {impl!r})")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
        key = f"{impl}/{preset}/{prec}"
        try:
            out[key] = json.loads(r.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            out[key] = {"error": (r.stderr.strip().splitlines() or ["no output"])[-1]}
    return out


# --- driver -------------------------------------------------------------------------------------------
SECTIONS = ("matmul", "train", "dispatch", "decode", "memory")


def run(quick: bool = False, hf: bool = True, sections: tuple[str, ...] = SECTIONS, log=print, device: str = "cpu",
        compile: bool = False, presets: tuple[str, ...] | None = None, shape: tuple[int, int] | None = None,
        precisions: tuple[str, ...] = ("fp32", "bf16"), reference: bool = True) -> dict:
    """Run the benchmark; returns the results dict (what --json prints). reference: also time dsv3 with its
    kernels off (`dsv3.kernels.disabled()`), in the same interleaved rounds."""
    reference = reference and kernels.enabled()  # with the kernels off (--no-kernels), dsv3 is the reference
    t0 = time.perf_counter()
    res = {"machine": machine(), "quick": quick, "device": device, "bench_overrides": BENCH_OVERRIDES,
           "kernels": kernels.enabled(),
           "train_optimizer": "torch.optim.AdamW(fused=True), both models"}
    try:
        import transformers  # noqa: F401
    except ImportError:
        hf = False
    presets = presets or (("tiny",) if quick else ("tiny", "174m"))
    shapes = {p: shape or TRAIN_SHAPES[p] for p in presets}
    if "matmul" in sections:
        log("matmul peak ...")
        res["matmul"] = bench_matmul(quick, device)
        res["bandwidth_gbs"] = bench_bandwidth(device)
    peaks = {k: v for k, v in res.get("matmul", {}).items() if k.startswith("peak_")}
    if "train" in sections:
        log("training step ...")
        res["train"] = {}
        for p in presets:  # the 174m step takes seconds on a CPU: fewer rounds; a GPU step, tens of ms
            reps = 10 if device == "cuda" else 3 if quick else 5 if p != "tiny" else 9
            res["train"].update(bench_train((p,), precisions, hf, reps=reps,
                                            peaks=peaks, device=device, compile=compile, shapes=shapes,
                                            reference=reference))
    if "dispatch" in sections and device == "cpu":
        log("MoE dispatch ...")
        res["dispatch"] = bench_dispatch(reps=5 if quick else 9)
    if "decode" in sections and device == "cpu":
        log("decoding ...")
        res["decode"] = {}
        for p in presets:
            res["decode"].update(bench_decode((p,), hf, reps=1 if quick else 3 if p == "tiny" else 2,
                                              bandwidth_gbs=res.get("bandwidth_gbs", 19.5), no_cache_reps=1,
                                              reference=reference))
    if "memory" in sections and not quick and device == "cpu":
        log("peak memory ...")
        variants = [("174m", "fp32", "dsv3"), ("174m", "bf16", "dsv3")] + ([("174m", "fp32", "hf")] if hf else [])
        res["memory"] = bench_memory(variants)
    res["wall_s"] = time.perf_counter() - t0
    return res


def table(res: dict) -> str:
    """Human-readable summary of a results dict."""
    m = res["machine"]
    lines = [f"machine: {m.get('cpu')} (family {m.get('cpu_family', '?')} model {m.get('cpu_model', '?')}), "
             f"{m.get('threads')} threads, AMX {m.get('amx')}, AVX512-BF16 "
             f"{m.get('avx512_bf16')}; torch {m.get('torch')}, transformers {m.get('transformers')}"
             + (f"; GPU {m['gpu']}" if m.get("gpu") else "")]
    if "matmul" in res:
        mm = res["matmul"]
        lines.append(f"matmul peak: fp32 {mm['peak_float32_gflops']:.0f} GFLOP/s, bf16 {mm['peak_bfloat16_gflops']:.0f}"
                     f" GFLOP/s; copy bandwidth {res['bandwidth_gbs']:.1f} GB/s")
        for dt in ("float32", "bfloat16"):
            lines.append(f"  {dt:<9}" + "  ".join(f"{k} {v['gflops']:.0f}" for k, v in mm[dt].items()))
    for preset, row in res.get("train", {}).items():
        probe = ", ".join(f"{p} {g:.0f}" for p, g in row.get("probe_gflops", {}).items())
        lines.append(f"train {preset} (batch {row['batch']} x {row['seq_len']}, {row['flops_per_token'] / 1e6:.0f} "
                     "MFLOP/token" + (f"; square-GEMM probe between steps, GFLOP/s: {probe}" if probe else "") + ")")
        lines.append(f"  {'variant':<18}{'step s':>8}{'tok/s':>9}{'GFLOP/s':>9}{'of peak':>9}{'vs HF':>7}"
                     f"{'vs HF fp32':>11}{'spread':>8}")
        for name, v in row["variants"].items():
            frac = f"{v['fraction_of_peak']:.0%}" if v.get("fraction_of_peak") else "-"
            vs = f"{v['vs_hf']:.2f}" if "vs_hf" in v else "-"
            vs32 = f"{v['vs_hf_fp32']:.2f}" if "vs_hf_fp32" in v else "-"
            lines.append(f"  {name:<18}{v['step_s']:>8.3f}{v['tokens_per_s']:>9.0f}{v['gflops']:>9.0f}{frac:>9}"
                         f"{vs:>7}{vs32:>11}{v['spread']:>8.0%}")
    if "dispatch" in res:
        d = res["dispatch"]
        lines.append(f"MoE dispatch fwd+bwd ({d['tokens']} tokens, {d['experts']} experts top-{d['top_k']}, width "
                     f"{d['inter_dim']}): grouped {d['grouped_ms']:.1f} ms, reference loop {d['naive_ms']:.1f} ms, "
                     f"{d['speedup']:.2f}x (max diff {d['max_abs_diff']:.1e}, spread {d['spread']:.0%})")
    for preset, row in res.get("decode", {}).items():
        lines.append(f"decode {preset} (batch 1, prompt {row['prompt']}, {row['new_tokens']} new, greedy; "
                     f"bandwidth floor {row['bandwidth_floor_tokens_per_s']:.0f} tok/s; same tokens "
                     f"{row['same_tokens_as_absorbed']}; first compiled run {row['first_compiled_run_s']:.1f} s)")
        lines.append(f"  {'method':<18}{'tok/s':>9}{'vs HF':>7}{'of floor':>10}{'cache B/tok/layer':>19}{'spread':>8}")
        for name, v in row["methods"].items():
            vs = f"{v['vs_hf']:.2f}" if "vs_hf" in v else "-"
            cb = v["cache_bytes_per_token_per_layer"]
            lines.append(f"  {name:<18}{v['tokens_per_s']:>9.1f}{vs:>7}{v['fraction_of_floor']:>10.0%}"
                         f"{('-' if cb is None else f'{cb:,}'):>19}{v['spread']:>8.0%}")
    for key, v in res.get("memory", {}).items():
        lines.append(f"peak RSS {key}: " + (f"{v['peak_rss_mb']:.0f} MB (after building the model: "
                                            f"{v['model_rss_mb']:.0f} MB)" if "peak_rss_mb" in v else v["error"]))
    lines.append(f"wall time {res['wall_s']:.0f} s")
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    """Bar charts: training tokens/s (dsv3 vs HF) and decoding tokens/s with the bandwidth floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(p, "train") for p in res.get("train", {})] + [(p, "decode") for p in res.get("decode", {})]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for ax, (preset, kind) in zip(axes[0], panels, strict=True):
        if kind == "train":
            items = {k: v["tokens_per_s"] for k, v in res["train"][preset]["variants"].items()}
            ax.set_title(f"training {preset}")
        else:
            items = {k: v["tokens_per_s"] for k, v in res["decode"][preset]["methods"].items()}
            ax.axhline(res["decode"][preset]["bandwidth_floor_tokens_per_s"], ls="--", c="gray",
                       label="bandwidth floor (fp32)")
            ax.legend(fontsize=7)
            ax.set_title(f"greedy decoding {preset}")
        colors = ["tab:orange" if k.startswith("hf") else "tab:gray" if k.startswith("reference") else "tab:blue"
                  for k in items]
        ax.bar(list(items), list(items.values()), color=colors)
        ax.set_ylabel("tokens/s")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.suptitle(f"dsv3 vs transformers on {res['machine'].get('cpu')} ({res['machine'].get('threads')} threads)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- CLI ----------------------------------------------------------------------------------------------


def add_cli_args(p) -> None:
    p.add_argument("--quick", action="store_true", help="tiny preset only, fewer repetitions (a couple of minutes)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--threads", type=int, help="torch.set_num_threads(N) first (default: torch's choice); on a "
                   "CPU shared with other jobs 1 thread avoids waiting at every op's thread barrier")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: matmul and training only")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd training steps")
    p.add_argument("--presets", help="comma-separated presets to train/decode (default: tiny,174m; --quick: tiny)")
    p.add_argument("--shape", help="training batch x seq for every preset, e.g. 16x1024 (default: per preset)")
    p.add_argument("--precisions", default="fp32,bf16", help="training precisions: fp32 and/or bf16 (autocast)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--no-reference", action="store_true", help="skip the reference columns (dsv3 with kernels off)")
    p.add_argument("--no-kernels", action="store_true", help="time dsv3 with its kernels off (the reference)")
    p.add_argument("--out", help="also write the JSON results to this file (default: none)")
    p.add_argument("--figure", help="also draw the bar charts to this image file, e.g. figures/benchmark.png "
                   "(default: none)")


def cmd_bench(args) -> int:
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise ValueError(f"--sections: unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    if args.threads is not None:
        if not 1 <= args.threads <= (os.cpu_count() or 1):
            raise ValueError(f"--threads must be in [1, {os.cpu_count()}], got {args.threads}")
        from dsv3.threads import fix

        fix(args.threads)  # the user's choice: the generation loop's thread governor stays off
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch")
    presets = tuple(p for p in (args.presets or "").split(",") if p) or None
    for p in presets or ():
        ModelConfig.preset(p)  # ValueError naming the known presets
    shape = None
    if args.shape:
        try:
            shape = tuple(int(v) for v in args.shape.lower().split("x"))
            assert len(shape) == 2 and min(shape) >= 1
        except (ValueError, AssertionError):
            raise ValueError(f"--shape must look like 16x1024 (batch x seq, both >= 1), got {args.shape!r}") from None
    precisions = tuple(v for v in args.precisions.split(",") if v)
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        raise ValueError(f"--precisions must be fp32, bf16 or fp32,bf16, got {args.precisions!r}")
    res = run(quick=args.quick, hf=not args.no_hf, sections=sections, device=args.device, compile=args.compile,
              presets=presets, shape=shape, precisions=precisions, reference=not args.no_reference,
              log=(lambda msg: print(msg, file=sys.stderr)) if args.json else print)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    if args.figure:
        plot(res, args.figure)
    print(json.dumps(res, indent=2) if args.json else table(res))
    return 0
