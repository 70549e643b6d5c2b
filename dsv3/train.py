"""Training: `TrainConfig`, `train()` (phase 1, and phase 2 by resuming), `History`, `evaluate()`.

One loop for the notebooks and the CLI. Per optimizer step: sample a global batch (`data.BatchSampler`),
run it as `grad_accum` micro-batches (micro-batch i = rows i::grad_accum) under autocast (bf16 on CUDA;
on CPU only when asked and the CPU has native bf16 matmul), loss = CE + aux + z (+ the multi-token prediction
term `mtp` when the model has MTP modules; coefficients from the model config), clip the gradient norm, AdamW
with weight-decay groups (no decay on norms), then the aux-loss-free router bias update.
The learning rate is a function of the global step (linear warmup, cosine to min_lr at decay_steps,
then flat), so phase 2 continues exactly where phase 1 left it. Every step appends a JSON line to
<out>/metrics.jsonl; validation runs every eval_interval steps on the held-out split.
A checkpoint holds everything the next step depends on (weights, router biases, optimizer, RNG,
sampler position, schedule), so N steps + resume M steps == N + M steps, bitwise on CPU in fp32.
Non-finite loss stops with an error naming the step (the last checkpoint is left as it was);
Ctrl-C finishes the current step, saves, and returns.
Under torchrun (WORLD_SIZE > 1) the same loop runs data parallel (distributed.py): rank r of w takes rows
r::w of each global batch, so w ranks x grad_accum a compute exactly what 1 process x grad_accum w*a does;
losses and expert loads are all-reduced, and rank 0 alone logs and saves. Without torchrun none of it runs.
Does not hold the model, the data pipeline or the checkpoint format: see model.py, data.py, checkpoint.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import checkpoint_dir, list_checkpoints, load_state, load_weights, resolve_checkpoint, save_checkpoint
from .config import PRESETS, ModelConfig
from .data import TOKENIZER_NAME, BatchSampler, load_tokens, split_tokens, val_batches
from .distributed import DataParallel, world_size_from_env
from .model import DeepSeekV3

# Per-preset training defaults; fields left None in TrainConfig take these.
# 174m: the seed's phase 1 (5000 steps of 16 x 1024 tokens, peak lr 1e-3, 100 warmup steps).
# tiny: sized for the CPU learning target (val loss <= 4.8 within 8 minutes on 2 cores).
TRAIN_PRESETS: dict[str, dict] = {
    "174m": dict(steps=5000, batch_size=16, seq_len=1024, lr=1e-3, warmup=100, eval_interval=250, save_interval=500),
    "tiny": dict(steps=480, batch_size=16, seq_len=128, lr=3e-3, warmup=20, eval_interval=120, save_interval=120),
}
PHASE2_STEPS = 500  # default length of a resumed run
# Fields that define the run itself: a resumed run keeps them (changing them would not be a resume).
_FIXED_ON_RESUME = ("preset", "model_overrides", "lr", "min_lr_ratio", "warmup", "decay_steps", "weight_decay",
                    "beta1", "beta2", "seed", "val_fraction")


@dataclass
class TrainConfig:
    preset: str = "tiny"  # model preset (dsv3.PRESETS); also picks the training defaults below
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields changed from the preset
    steps: int | None = None  # optimizer steps to run (phase 1: total; resume: additional, default 500)
    batch_size: int | None = None  # sequences per optimizer step (split over ranks, then grad_accum micro-batches)
    seq_len: int | None = None  # tokens per sequence (inputs; windows are seq_len + 1)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio and stays there
    warmup: int | None = None  # linear warmup steps
    decay_steps: int | None = None  # step where the cosine reaches min_lr; None = steps of phase 1
    weight_decay: float = 0.1  # AdamW decay on matrices (not on norms)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm (0 = no clipping)
    eval_interval: int | None = None  # validate every this many steps (and at the end)
    eval_batches: int | None = None  # validation batches (of max(batch_size, 16) rows) per evaluation; None = all
    save_interval: int | None = None  # save every this many steps (and at the end); None/0 = end only
    keep: int = 3  # checkpoints kept in the run folder
    dtype: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "fp32" or "bf16"
    compile: bool = False  # torch.compile the model for training
    threads: int | None = None  # CPU threads for this run (None = torch's default); 1 wins on a busy machine
    seed: int = 0  # model init and data order
    corpus: str | None = None  # text file; None = $DSV3_CORPUS, else Tiny Shakespeare
    val_fraction: float = 0.1  # the last 10% of tokens is held out
    device: str = "auto"  # "auto", "cpu", "cuda", ...
    out: str | None = None  # run folder; None = checkpoints/<preset> (resume: the resumed run's folder)
    overwrite: bool = False  # phase 1 into a folder that holds checkpoints: delete them first
    progress: bool = True  # tqdm progress bar
    time_limit: float | None = None  # stop (evaluate and save) once this many seconds have passed

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        for k, v in TRAIN_PRESETS.get(self.preset, TRAIN_PRESETS["174m"]).items():
            if getattr(self, k) is None:
                setattr(self, k, v)

        def need(ok, msg):
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")

        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_interval", "keep"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"{name} must be an int >= 1, got {v!r}")
        need(self.batch_size % self.grad_accum == 0,
             f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        need(self.decay_steps is None or self.decay_steps >= 1, f"decay_steps must be >= 1, got {self.decay_steps}")
        need(self.weight_decay >= 0 and self.grad_clip >= 0, "weight_decay and grad_clip must be >= 0")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        need(self.eval_batches is None or self.eval_batches >= 1,
             f"eval_batches must be >= 1 or None, got {self.eval_batches}")
        need(self.save_interval is None or self.save_interval >= 0,
             f"save_interval must be >= 0, got {self.save_interval}")
        need(self.dtype in ("auto", "fp32", "bf16"), f"dtype must be 'auto', 'fp32' or 'bf16', got {self.dtype!r}")
        need(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        need(self.time_limit is None or self.time_limit > 0, f"time_limit must be > 0 seconds, got {self.time_limit}")
        need(self.threads is None or self.threads >= 1, f"threads must be >= 1 or None, got {self.threads}")

    def model_config(self) -> ModelConfig:
        cfg = ModelConfig.preset(self.preset, **self.model_overrides)
        if self.seq_len > cfg.max_seq_len:
            raise ValueError(f"seq_len {self.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
        return cfg

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based): warmup, cosine to min_lr, then flat (never jumps)."""
        min_lr = self.lr * self.min_lr_ratio
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        horizon = self.decay_steps or self.steps
        if step >= horizon:
            return min_lr
        progress = (step - self.warmup) / max(1, horizon - self.warmup)
        return min_lr + 0.5 * (self.lr - min_lr) * (1 + math.cos(math.pi * progress))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class History:
    """What a run measured: one record per optimizer step, one per validation; plots take this."""

    # step, loss, ce, aux, z, (mtp: with MTP modules), lr, grad_norm, tokens_per_s, expert_load
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)  # step, val_loss, expert_load (summed over the eval batches)
    run_dir: str | None = None
    checkpoint: str | None = None  # the last checkpoint saved
    interrupted: bool = False  # stopped by Ctrl-C (a checkpoint was saved)
    model: DeepSeekV3 | None = field(default=None, repr=False, compare=False)  # the trained model (eval mode)

    def column(self, key: str, kind: str = "train") -> list:
        return [r[key] for r in getattr(self, kind)]

    def expert_load_fractions(self, kind: str = "train") -> np.ndarray:
        """(records, moe_layers, n_routed_experts): share of routed slots each expert took."""
        return np.asarray(self.column("expert_load", kind), dtype=np.float64)

    def max_over_mean_load(self) -> list[float]:
        """Per MoE layer: busiest expert's load / mean load in the last validation (1.0 = balanced)."""
        load = np.asarray(self.val[-1]["expert_load"], dtype=np.float64)
        return (load.max(-1) / load.mean(-1)).tolist()

    def to_dict(self) -> dict:
        return {"train": self.train, "val": self.val}

    @classmethod
    def from_dict(cls, d: dict, **kw) -> History:
        return cls(train=list(d.get("train", [])), val=list(d.get("val", [])), **kw)

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike) -> History:
        """Rebuild a History from a run's metrics.jsonl (e.g. one written by the CLI)."""
        h = cls(run_dir=str(Path(path).parent))
        for line in Path(path).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                (h.val if r.pop("kind", "train") == "val" else h.train).append(r)
        return h


# --- helpers ---
def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run natively (otherwise bf16 autocast on CPU is slower than fp32)."""
    if "AMX" in torch.backends.cpu.get_cpu_capability():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("amx_bf16", "avx512_bf16"))


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a TrainConfig.dtype, or None for plain fp32."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if dtype == "bf16":
        if device.type == "cpu" and not cpu_has_native_bf16():
            raise ValueError("dtype 'bf16' on this CPU: no native bf16 matmul (AMX / AVX512-BF16); use fp32")
        return torch.bfloat16
    return None


def make_optimizer(model: DeepSeekV3, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with two groups: matrices decay, vectors (RMSNorm weights) do not."""
    params = [p for p in model.parameters() if p.requires_grad]  # the tied embedding/head once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused: one kernel for all parameters (CUDA and CPU); bitwise deterministic on CPU
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type in ("cuda", "cpu"))


@torch.no_grad()
def evaluate(model: DeepSeekV3, tokens: np.ndarray, batch_size: int, seq_len: int,
             max_batches: int | None = None, amp: torch.dtype | None = None) -> tuple[float, list]:
    """(mean next-token CE over the validation windows, per-layer routed-slot counts summed over them)."""
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    total, n, loads = 0.0, 0, None
    for x, y in val_batches(tokens, batch_size, seq_len, max_batches):
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            out = model(x.to(device), y.to(device), return_logits=False)
        total += out.ce_loss.item() * y.numel()
        n += y.numel()
        load = model.expert_loads()
        loads = load if loads is None else loads + load
    model.train(was_training)
    return total / n, (loads.tolist() if loads is not None else [])


class _DeferInterrupt:
    """Turn the first Ctrl-C into a flag the loop checks between steps (a second Ctrl-C stops at once).

    escalate=False (under torchrun): repeats are ignored too, because a terminal's Ctrl-C reaches each worker
    twice, directly and forwarded by torchrun (which itself kills workers still running 30 s later)."""

    def __init__(self, escalate: bool = True):
        self.escalate = escalate

    def __enter__(self):
        self.requested, self._prev = False, None
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and self.escalate:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)


def _resolve_config(config: TrainConfig | None, resume, overrides: dict) -> tuple[TrainConfig, dict | None]:
    if resume is None:
        if config is None:
            return TrainConfig(**overrides), None
        return dataclasses.replace(config, **overrides), None
    if config is not None:
        raise ValueError("pass either a TrainConfig (phase 1) or resume=<checkpoint> with overrides, not both")
    ckpt = resolve_checkpoint(resume)
    state = load_state(ckpt)
    saved = dict(state["train_config"])
    for k in _FIXED_ON_RESUME:
        if k in overrides and overrides[k] != saved.get(k):
            raise ValueError(f"{k} cannot change on resume (checkpoint: {saved.get(k)!r}, given: {overrides[k]!r}); "
                             "the run, its LR schedule and its data order continue from the checkpoint")
    saved.update(steps=PHASE2_STEPS, out=str(ckpt.parent), time_limit=None, overwrite=False)
    saved.update(overrides)
    return TrainConfig(**saved), state


def _write_jsonl(path: Path, records) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


# --- the loop ---
def train(config: TrainConfig | None = None, *, resume: str | os.PathLike | None = None, **overrides) -> History:
    """Run phase 1 (`config` / keyword fields) or continue a run (`resume=` checkpoint or run folder).

    On resume, `steps` counts additional steps (default 500) and the LR schedule, data order and
    everything else continue from the checkpoint. Returns the History, with `.model` (eval mode)
    and `.checkpoint` (the last saved checkpoint folder).
    """
    t_start = time.perf_counter()
    cfg, state = _resolve_config(config, resume, overrides)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = world_size_from_env()
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"batch_size ({cfg.batch_size}) must be a multiple of world_size x grad_accum "
                         f"({world} x {cfg.grad_accum})")
    dp = DataParallel.setup(resolve_device(cfg.device))  # None unless launched by torchrun with WORLD_SIZE > 1
    try:
        return _train(cfg, state, t_start, dp)
    finally:
        torch.set_num_threads(threads)
        if dp is not None:
            dp.close()


def _train(cfg: TrainConfig, state: dict | None, t_start: float, dp: DataParallel | None = None) -> History:
    device = resolve_device(cfg.device) if dp is None else dp.device
    rank, world = (0, 1) if dp is None else (dp.rank, dp.world_size)
    main = rank == 0  # the one process that logs, writes metrics and saves
    amp = autocast_dtype(cfg.dtype, device)
    model_cfg = cfg.model_config()
    out = Path(cfg.out or f"checkpoints/{cfg.preset}")
    if state is None:
        if cfg.decay_steps is None:
            cfg.decay_steps = cfg.steps  # fix the schedule's horizon now, so a resume continues it
        if list_checkpoints(out):
            if not cfg.overwrite:
                raise ValueError(f"run folder {out} already holds checkpoints; resume from it, choose another "
                                 "out folder, or pass overwrite=True (--overwrite) to start over")
            for p in list_checkpoints(out) if main else []:
                shutil.rmtree(p)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    with torch.device(device):
        model = DeepSeekV3(model_cfg)
    train_tok, val_tok = split_tokens(load_tokens(cfg.corpus), cfg.val_fraction)
    sampler = BatchSampler(train_tok, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world)  # global state
    optimizer = make_optimizer(model, cfg, device)
    history = History(run_dir=str(out))
    step = 0
    if state is not None:
        load_weights(model, state["path"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng_torch"])
        random.setstate(state["python_rng"])
        history = History.from_dict(state["history"], run_dir=str(out), checkpoint=state["path"])
        step = state["step"]
    model.train()
    ddp = None if dp is None else dp.wrap(model)  # averages gradients over ranks
    fwd = model if ddp is None else ddp
    if cfg.compile:
        model.compile_blocks()
    metrics = out / "metrics.jsonl"
    if main:
        _write_jsonl(metrics, [r | {"kind": "train"} for r in history.train] +
                     [r | {"kind": "val"} for r in history.val])
    end = step + cfg.steps
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def save() -> None:
        meta = {"tokenizer": TOKENIZER_NAME, "train_config": cfg.to_dict(), "sampler": sampler.state_dict(),
                "history": history.to_dict()}
        if main:
            save_checkpoint(out, model, step=step, optimizer=optimizer, meta=meta, keep=cfg.keep)
        history.checkpoint = str(checkpoint_dir(out, step))
        if dp is not None:
            dp.barrier()  # the checkpoint is complete before any rank moves on

    def validate() -> None:
        rows = max(cfg.batch_size, 16)  # no gradients to hold: at least 16 rows per forward
        val_loss, load = evaluate(model, val_tok, rows, cfg.seq_len, cfg.eval_batches, amp)
        rec = {"step": step, "val_loss": val_loss, "expert_load": load}
        history.val.append(rec)  # every rank evaluates (the same numbers) rather than idling at a barrier
        if main:
            with metrics.open("a") as f:
                f.write(json.dumps(rec | {"kind": "val"}) + "\n")

    from tqdm.auto import tqdm

    bar = tqdm(total=end, initial=step, disable=not (cfg.progress and main), desc=f"train {cfg.preset}", unit="step")
    log_file = metrics if main else os.devnull
    with _DeferInterrupt(escalate=dp is None) as interrupt, bar, open(log_file, "a") as log:
        while step < end:
            late = cfg.time_limit is not None and time.perf_counter() - t_start >= cfg.time_limit
            stop = interrupt.requested or late
            if stop if dp is None else dp.any(stop):  # every rank stops after the same step
                break
            t0 = time.perf_counter()
            lr = cfg.lr_at(step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = sampler.next()
            sums = torch.zeros(5, device=device)
            for i in range(cfg.grad_accum):
                xb, yb = x[i::cfg.grad_accum].to(device), y[i::cfg.grad_accum].to(device)
                last = i == cfg.grad_accum - 1  # DDP all-reduces the accumulated gradients on the last one only
                with contextlib.nullcontext() if ddp is None or last else ddp.no_sync():
                    with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                        o = fwd(xb, yb, return_logits=False)  # fused chunked head + CE: no (B, T, vocab) logits
                    (o.loss / cfg.grad_accum).backward()
                sums += torch.stack([o.loss, o.ce_loss, o.aux_loss, o.z_loss, o.mtp_loss]).detach().float() \
                    / cfg.grad_accum
            if dp is not None:  # global mean loss, and the global expert load for the bias update below
                sums = dp.reduce_step(sums, model)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            loads = [m.gate.step_load / m.gate.step_load.sum().clamp(min=1) for m in model.moe_layers()]
            # one host sync per step (a GPU keeps running ahead otherwise): losses, gradient norm, expert loads
            host = torch.cat([sums, grad_norm.reshape(1).float(), *loads]).cpu()
            if not torch.isfinite(host[0]):  # checked before the optimizer step: nothing is corrupted or saved
                raise FloatingPointError(
                    f"non-finite loss ({host[0].item()}) at step {step + 1}; stopped without saving. "
                    f"Last good checkpoint: {history.checkpoint or 'none yet'}")
            if not torch.isfinite(host[5]):
                raise FloatingPointError(f"non-finite gradient norm at step {step + 1}; stopped without saving. "
                                         f"Last good checkpoint: {history.checkpoint or 'none yet'}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            load = host[6:].view(len(loads), -1).tolist() if loads else []
            model.update_router_bias()  # b_i update (when bias_update_speed > 0); resets the step's counts
            step += 1
            dt = time.perf_counter() - t0
            loss, ce, aux, z, mtp = host[:5].tolist()
            rec = {"step": step, "loss": loss, "ce": ce, "aux": aux, "z": z,
                   **({"mtp": mtp} if model.mtp is not None else {}), "lr": lr, "grad_norm": host[5].item(),
                   "tokens_per_s": x.numel() * world / dt,
                   "elapsed": time.perf_counter() - t_start,
                   "expert_load": [[round(v, 5) for v in row] for row in load]}
            history.train.append(rec)
            log.write(json.dumps(rec | {"kind": "train"}) + "\n")
            log.flush()
            if step % cfg.eval_interval == 0 and step != end:
                validate()  # (the last step's validation runs after the loop)
            if cfg.save_interval and step % cfg.save_interval == 0 and step != end:
                save()
            bar.update(1)
            post = {"loss": f"{loss:.3f}", **({"mtp": f"{mtp:.3f}"} if "mtp" in rec else {}),
                    "tok/s": f"{rec['tokens_per_s']:.0f}"}
            if history.val:
                post["val"] = f"{history.val[-1]['val_loss']:.3f}"
            bar.set_postfix(post, refresh=False)
        history.interrupted = interrupt.requested
        validate()
        if history.checkpoint is None or Path(history.checkpoint).name != checkpoint_dir(out, step).name:
            save()
    model.eval()
    history.model = model
    return history


# --- command line (`python -m dsv3 train`; registered in __main__.py) ---
def add_cli_args(p) -> None:
    """The `train` subcommand's flags; unset flags keep the preset's (or the checkpoint's) values."""
    p.add_argument("--preset", choices=list(PRESETS), help="model preset (default tiny); ignored with --resume")
    p.add_argument("--resume", metavar="PATH", help="continue from a checkpoint or run folder (phase 2)")
    p.add_argument("--steps", type=int, help="optimizer steps (with --resume: additional steps, default 500)")
    p.add_argument("--out", help="run folder for checkpoints and metrics.jsonl (default checkpoints/<preset>)")
    p.add_argument("--overwrite", action="store_true", default=None, help="delete checkpoints already in --out")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--warmup", type=int, help="linear warmup steps")
    p.add_argument("--batch-size", type=int, help="sequences per optimizer step")
    p.add_argument("--seq-len", type=int, help="tokens per sequence")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--eval-interval", type=int, help="validate every N steps")
    p.add_argument("--eval-batches", type=int, help="validation batches per evaluation")
    p.add_argument("--save-interval", type=int, help="save every N steps (0 = only at the end)")
    p.add_argument("--keep", type=int, help="checkpoints to keep")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"],
                   help="autocast dtype (bf16 on CPU needs AMX/AVX512-BF16)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--seed", type=int, help="seed for init and data order")
    p.add_argument("--corpus", help="UTF-8 text file (default $DSV3_CORPUS, else Tiny Shakespeare)")
    p.add_argument("--device", help="auto, cpu, cuda, ...")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's; 1 is faster on a busy machine)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS", help="stop, validate and save after this long")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="ModelConfig override for phase 1, e.g. --set n_layers=2 (repeatable)")
    p.add_argument("--mtp-layers", type=int, metavar="D",
                   help="multi-token prediction modules (DeepSeek-V3 §2.2; = --set n_mtp_layers=D)")
    p.add_argument("--mtp-weight", type=float, metavar="LAMBDA",
                   help="weight of the MTP loss (default 0.3; = --set mtp_loss_weight=LAMBDA)")


def cmd_train(args) -> int:
    fields_ = {f.name for f in dataclasses.fields(TrainConfig)}
    over = {k: v for k, v in vars(args).items() if k in fields_ and v is not None}
    mtp = {k: v for k, v in (("n_mtp_layers", args.mtp_layers), ("mtp_loss_weight", args.mtp_weight)) if v is not None}
    if args.set or mtp:
        if args.resume:
            raise ValueError("--set, --mtp-layers and --mtp-weight change the model and cannot be combined with "
                             "--resume")
        mo = {}
        for item in args.set:
            k, sep, v = item.partition("=")
            if not sep:
                raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
            try:
                mo[k] = json.loads(v)
            except json.JSONDecodeError:
                mo[k] = v
        over["model_overrides"] = mo | mtp
    over.pop("preset", None) if args.resume else None
    try:
        h = train(resume=args.resume, **over)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports for the whole data-parallel run
    last, val = h.train[-1] if h.train else {}, h.val[-1] if h.val else {}
    tps = [r["tokens_per_s"] for r in h.train[-50:]]
    print(f"{'interrupted' if h.interrupted else 'done'}: step {val.get('step')}, "
          f"{sum(tps) / max(1, len(tps)):.0f} tokens/s (last {len(tps)} steps), "
          f"train loss {last.get('loss', float('nan')):.4f}, val loss {val.get('val_loss', float('nan')):.4f}, "
          f"max/mean expert load {max(h.max_over_mean_load(), default=1.0):.2f}, checkpoint {h.checkpoint}")
    return 130 if h.interrupted else 0
