"""Training: `TrainConfig`, `train()` (phase 1, and phase 2 by resuming), `History`, `evaluate()`.

One loop for the notebooks and the CLI. Per optimizer step: sample a global batch (`data.BatchSampler`),
run it as `grad_accum` micro-batches (micro-batch i = rows i::grad_accum) under autocast (devices.py: bf16 where
the GPU has it, fp16 with a loss scaler on older CUDA GPUs, fp32 on the CPU unless asked), loss = CE + aux + z
(+ the multi-token prediction term `mtp` when the model has MTP modules; coefficients from the model config),
clip the gradient norm, AdamW with weight-decay groups (no decay on norms), then the aux-loss-free router bias
update. Under fp16 a step whose gradients overflowed is skipped (the scaler lowers its scale; the count is logged).
The learning rate is a function of the global step (linear warmup, cosine to min_lr at decay_steps,
then flat), so phase 2 continues exactly where phase 1 left it. Every step appends a JSON line to
<out>/metrics.jsonl; validation runs every eval_interval steps on the held-out split, and whenever its loss is
the lowest so far the model is also saved as <out>/best (optionally, training stops after `early_stop`
validations without a new best).
A checkpoint holds everything the next step depends on (weights, router biases, optimizer, RNG,
sampler position, schedule), so N steps + resume M steps == N + M steps, bitwise on CPU in fp32.
Non-finite loss stops with an error naming the step (the last checkpoint is left as it was);
Ctrl-C finishes the current step, saves, and returns. One training at a time per run folder (checkpoint.run_lock);
a save that fails (a full disk) stops with one line, the earlier checkpoints intact and resumable.
Reading order: `train()` -> `_train` (the loop) -> `_Run`: set-up and resume, `optimizer_step`, `validate`, `save`.
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
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from .checkpoint import (
    RunInUse,
    best_checkpoint,
    checkpoint_dir,
    copy_checkpoint,
    list_checkpoints,
    load_state,
    load_weights,
    read_meta,
    remove_all,
    resolve_checkpoint,
    run_lock,
    save_checkpoint,
)
from .config import FIELD_FLAGS, PRESETS, ModelConfig, SettingError
from .data import TOKENIZER_NAME, BatchSampler, counts_tensor, load_tokens, split_tokens, token_counts, val_batches
from .devices import DTYPES, autocast_dtype, describe, precision_name, resolve_device
from .distributed import DataParallel, world_size_from_env
from .model import DeepSeekV3
from .threads import governor as thread_governor

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
    keep: int = 3  # checkpoints kept in the run folder (besides best/, the lowest validation loss)
    early_stop: int = 0  # stop after this many validations without a new best (0 = never)
    dtype: str = "auto"  # "auto" (devices.autocast_dtype: bf16, fp16 + loss scaling on older GPUs, fp32 on CPU),
    # "fp32", "bf16" or "fp16"
    compile: bool = False  # torch.compile the model for training
    threads: int | None = None  # CPU threads for this run (None = torch's default); 1 wins on a busy machine
    seed: int = 0  # model init and data order
    corpus: str | None = None  # text file; None = $DSV3_CORPUS, else Tiny Shakespeare
    val_fraction: float = 0.1  # the last 10% of tokens is held out
    device: str = "auto"  # "auto" (CUDA, then MPS, then the CPU: devices.resolve_device), "cpu", "cuda", "mps", ...
    out: str | None = None  # run folder; None = checkpoints/<preset> (resume: the resumed run's folder)
    overwrite: bool = False  # phase 1 into a folder that holds checkpoints: delete them first
    progress: bool = True  # tqdm progress bar
    time_limit: float | None = None  # stop (evaluate and save) once this many seconds have passed

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise SettingError(f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}", ("preset",))
        for k, v in TRAIN_PRESETS.get(self.preset, TRAIN_PRESETS["174m"]).items():
            if getattr(self, k) is None:
                setattr(self, k, v)

        def need(ok, msg, *names):
            if not ok:
                raise SettingError(msg, names)

        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_interval", "keep"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"{name} must be an int >= 1, got {v!r}")
        need(self.batch_size % self.grad_accum == 0,
             f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})",
             "batch_size", "grad_accum")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        need(self.decay_steps is None or self.decay_steps >= 1, f"decay_steps must be >= 1, got {self.decay_steps}")
        need(self.weight_decay >= 0 and self.grad_clip >= 0, "weight_decay and grad_clip must be >= 0",
             "weight_decay", "grad_clip")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)", "beta1", "beta2")
        need(self.eval_batches is None or self.eval_batches >= 1,
             f"eval_batches must be >= 1 or None, got {self.eval_batches}")
        need(self.save_interval is None or self.save_interval >= 0,
             f"save_interval must be >= 0, got {self.save_interval}")
        need(self.dtype in DTYPES, f"dtype must be one of {', '.join(map(repr, DTYPES))}, got {self.dtype!r}")
        need(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        need(self.time_limit is None or self.time_limit > 0, f"time_limit must be > 0 seconds, got {self.time_limit}")
        need(self.threads is None or self.threads >= 1, f"threads must be >= 1 or None, got {self.threads}")
        need(isinstance(self.early_stop, int) and self.early_stop >= 0,
             f"early_stop must be an int >= 0 (0 = off), got {self.early_stop!r}")

    def model_config(self) -> ModelConfig:
        cfg = ModelConfig.preset(self.preset, **self.model_overrides)
        if self.seq_len > cfg.max_seq_len:
            raise SettingError(f"seq_len {self.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
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
    """What a run measured: one record per optimizer step, one per validation; plots take this.

    train: ce (the next-token cross-entropy on the step's batch), aux and z (the router losses, weighted),
    with MTP modules mtp_ce (their cross-entropy, mean over depths) and mtp (its weighted term, lambda x mtp_ce),
    loss (the total optimized: ce + aux + z + mtp), lr, grad_norm, tokens_per_s, expert_load; under fp16
    loss_scale and skipped_steps. val: val_ce (the cross-entropy on the held-out split) and expert_load
    (summed over the eval batches); val_loss is the same number under its older name."""

    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    run_dir: str | None = None
    checkpoint: str | None = None  # the last checkpoint saved
    interrupted: bool = False  # stopped by Ctrl-C (a checkpoint was saved)
    stopped_early: bool = False  # stopped by early_stop (validation stopped improving)
    best: dict | None = None  # step, val_loss of the lowest validation loss so far (saved as <run>/best)
    model: DeepSeekV3 | None = field(default=None, repr=False, compare=False)  # the trained model (eval mode)

    @property
    def best_step(self) -> int | None:
        return self.best["step"] if self.best else None

    @property
    def best_val_loss(self) -> float | None:
        return self.best["val_loss"] if self.best else None

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped because fp16 gradients overflowed (0 without fp16 loss scaling)."""
        return self.train[-1].get("skipped_steps", 0) if self.train else 0

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
        return {"train": self.train, "val": self.val, "best": self.best}

    @classmethod
    def from_dict(cls, d: dict, **kw) -> History:
        return cls(train=list(d.get("train", [])), val=list(d.get("val", [])), best=d.get("best"), **kw)

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike) -> History:
        """Rebuild a History from a run's metrics.jsonl (e.g. one written by the CLI)."""
        h = cls(run_dir=str(Path(path).parent))
        for line in Path(path).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                (h.val if r.pop("kind", "train") == "val" else h.train).append(r)
        if h.val:
            best = min(h.val, key=lambda r: r["val_loss"])  # the first of equal losses, as training keeps it
            h.best = {"step": best["step"], "val_loss": best["val_loss"]}
        return h


# --- helpers ---
def _mtp_figures(model: DeepSeekV3, mtp: float) -> dict:
    """With MTP modules: the weighted term the loss adds (mtp = lambda / D * sum_k CE_k) and the MTP cross-entropy
    itself (mean over the D depths), which is what compares with the main head's CE."""
    if model.mtp is None:
        return {}
    lam = model.cfg.mtp_loss_weight
    return {"mtp": mtp, **({"mtp_ce": mtp / lam} if lam > 0 else {})}


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
            raise SettingError(f"{k} cannot change on resume (checkpoint: {saved.get(k)!r}, given: {overrides[k]!r}); "
                             "the run, its LR schedule and its data order continue from the checkpoint", (k,))
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
    and `.checkpoint` (the last saved checkpoint folder). A second training into a run folder in use is
    refused (checkpoint.RunInUse); a save that fails (a full disk) raises RunWriteError, the checkpoints
    already saved intact.
    """
    t_start = time.perf_counter()
    cfg, state = _resolve_config(config, resume, overrides)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = world_size_from_env()
    if cfg.batch_size % (world * cfg.grad_accum):
        raise SettingError(f"batch_size ({cfg.batch_size}) must be a multiple of world_size x grad_accum "
                           f"({world} x {cfg.grad_accum})", ("batch_size", "grad_accum"))
    dp = DataParallel.setup(resolve_device(cfg.device))  # None unless launched by torchrun with WORLD_SIZE > 1
    try:  # rank 0 holds the run folder's lock (the ranks of one run share it)
        with run_lock(_run_dir(cfg)) if dp is None or dp.is_main else contextlib.nullcontext():
            return _train(cfg, state, t_start, dp)
    finally:
        torch.set_num_threads(threads)
        if dp is not None:
            dp.close()


class RunWriteError(RuntimeError):
    """A checkpoint or metrics line could not be written (a full disk); what was saved before is intact."""


def _run_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.out or f"checkpoints/{cfg.preset}")


def _check_run_dir(cfg: TrainConfig, state: dict | None, out: Path, main: bool) -> None:
    """Phase 1 needs an empty run folder (or overwrite, which empties it); a resume must not lose later steps."""
    if state is None:
        if cfg.decay_steps is None:
            cfg.decay_steps = cfg.steps  # fix the schedule's horizon now, so a resume continues it
        if list_checkpoints(out) or best_checkpoint(out):
            if not cfg.overwrite:
                raise ValueError(f"run folder {out} already holds checkpoints; resume from it, choose another "
                                 "out folder, or pass overwrite=True (--overwrite) to start over")
            if main:
                remove_all(out)
    else:
        newer = [p.name for p in list_checkpoints(out) if int(p.name[5:]) > state["step"]]
        if newer:  # continuing from an older checkpoint would overwrite (and prune) the run's later ones
            raise ValueError(f"run folder {out} holds checkpoints newer than step {state['step']} "
                             f"({', '.join(newer)}); continue into another folder: out=... (--out)")
    out.mkdir(parents=True, exist_ok=True)


def _train(cfg: TrainConfig, state: dict | None, t_start: float, dp: DataParallel | None = None) -> History:
    """Set up (or resume) the run, then optimizer steps, validating and saving at their intervals, until the
    step count, early stopping, the time limit or Ctrl-C; then a last validation and save."""
    run = _Run(cfg, state, t_start, dp)
    end, history = run.step + cfg.steps, run.history
    with _DeferInterrupt(escalate=dp is None) as interrupt, run.progress_bar(end):
        while run.step < end:
            late = cfg.time_limit is not None and time.perf_counter() - t_start >= cfg.time_limit
            stop = interrupt.requested or late
            if stop if dp is None else dp.any(stop):  # every rank stops after the same step
                break
            run.record(run.optimizer_step())
            if run.step % cfg.eval_interval == 0 or run.step == end:
                history.stopped_early = run.validate()
            if run.step == end or history.stopped_early:
                break  # (the final save follows the loop)
            if cfg.save_interval and run.step % cfg.save_interval == 0:
                run.save()
        history.interrupted = interrupt.requested
        run.validate()  # (no-op if this step was validated in the loop)
        if history.checkpoint is None or Path(history.checkpoint).name != checkpoint_dir(run.out, run.step).name:
            run.save()
    run.model.eval()
    history.model = run.model
    return history


class _Run:
    """One training run while it runs: set-up and resume (here), one optimizer step (`optimizer_step`, `record`),
    validation and saving (`validate`, `save`). `_train` drives it."""

    def __init__(self, cfg: TrainConfig, state: dict | None, t_start: float, dp: DataParallel | None):
        self.cfg, self.dp, self.t_start = cfg, dp, t_start
        self.device = resolve_device(cfg.device) if dp is None else dp.device
        rank, self.world = (0, 1) if dp is None else (dp.rank, dp.world_size)
        self.main = rank == 0  # the one process that logs, writes metrics and saves
        self.amp = autocast_dtype(cfg.dtype, self.device)
        model_cfg = cfg.model_config()
        self.out = _run_dir(cfg)
        _check_run_dir(cfg, state, self.out, self.main)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        with torch.device(self.device):
            self.model = DeepSeekV3(model_cfg)
        train_tok, self.val_tok = split_tokens(load_tokens(cfg.corpus), cfg.val_fraction)
        self.counts = token_counts(train_tok, model_cfg.vocab_size)  # saved with each checkpoint: the draft vocabulary
        self.model.token_counts = counts_tensor(self.counts, model_cfg.vocab_size)
        if self.main and cfg.progress:  # (once the data is there) which device "auto" picked, and how it computes
            print(f"training on {describe(self.device)}, {precision_name(self.amp)}", file=sys.stderr)
        self.sampler = BatchSampler(train_tok, cfg.batch_size, cfg.seq_len, cfg.seed, rank, self.world)  # global
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        # fp16 gradients underflow unless the loss is scaled up; a step whose gradients overflowed is skipped
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)  # else: no-ops
        self.history, self.step = History(run_dir=str(self.out)), 0
        if state is not None:
            self._resume(state)
        self.model.train()
        self.fwd = self.model if dp is None else dp.wrap(self.model)  # DDP averages gradients over ranks
        if cfg.compile:
            self.model.compile_blocks()
        self.metrics = self.out / "metrics.jsonl"
        if self.main:
            _write_jsonl(self.metrics, [r | {"kind": "train"} for r in self.history.train] +
                         [r | {"kind": "val"} for r in self.history.val])
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.governor = thread_governor(explicit=bool(cfg.threads), device=self.device, compiled=cfg.compile)
        if self.governor is not None:  # see threads.py
            self.governor.begin()  # (train() gives the caller back its thread count)

    def _resume(self, state: dict) -> None:
        """Everything the next step depends on, from the checkpoint; a run continued in a new folder brings its
        best so far along."""
        load_weights(self.model, state["path"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:  # an fp16 run's loss scale (ignored when this run does not scale)
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng_torch"])
        random.setstate(state["python_rng"])
        self.history = History.from_dict(state["history"], run_dir=str(self.out), checkpoint=state["path"])
        self.step = state["step"]
        src, best = Path(state["path"]).parent, self.history.best
        if self.main and src.resolve() != self.out.resolve() and best and best_checkpoint(self.out) is None:
            found = best_checkpoint(src)
            if found is not None and read_meta(found)["step"] == best["step"]:
                copy_checkpoint(found, self.out, best=True)

    def progress_bar(self, end: int):
        from tqdm.auto import tqdm

        self.desc = f"train {self.cfg.preset}"
        self.bar = tqdm(total=end, initial=self.step, disable=not (self.cfg.progress and self.main), desc=self.desc,
                        unit="step")
        return self.bar

    def status(self, what: str | None) -> None:
        """"validating" / "saving" beside the step count while it happens."""
        self.bar.set_description(f"{self.desc} ({what})" if what else self.desc)

    def optimizer_step(self) -> dict:
        """One optimizer step: the global batch as grad_accum micro-batches, clip, AdamW (skipped on an fp16
        overflow), the router bias update. Returns the step's record."""
        cfg, model, t0 = self.cfg, self.model, time.perf_counter()
        lr = cfg.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        x, y = self.sampler.next()
        sums = self._forward_backward(x, y)
        if self.dp is not None:  # global mean loss, and the global expert load for the bias update below
            sums = self.dp.reduce_step(sums, model)
        self.scaler.unscale_(self.optimizer)  # the gradients' true values, for clipping and the logged norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        loads = [m.gate.step_load / m.gate.step_load.sum().clamp(min=1) for m in model.moe_layers()]
        # one host sync per step (a GPU keeps running ahead otherwise): losses, gradient norm, expert loads
        host = torch.cat([sums, grad_norm.reshape(1).float(), *loads]).cpu()
        self._check_finite(host[0], host[5])
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)  # skipped when the gradients overflowed in fp16
        self.scaler.update()  # ... and then the scale is lowered (it is raised after 2000 clean steps)
        skipped = scale is not None and self.scaler.get_scale() < scale
        self.optimizer.zero_grad(set_to_none=True)
        load = host[6:].view(len(loads), -1).tolist() if loads else []
        model.update_router_bias()  # b_i update (when bias_update_speed > 0); resets the step's counts
        self.step += 1
        if self.governor is not None:
            self.governor.tick()  # fewer threads while another job shares the CPU cores
        dt = time.perf_counter() - t0
        loss, ce, aux, z, mtp = host[:5].tolist()
        return {"step": self.step, "loss": loss, "ce": ce, "aux": aux, "z": z,
                **_mtp_figures(model, mtp), "lr": lr, "grad_norm": host[5].item(),
                **({"loss_scale": scale, "skipped_steps": self.history.skipped_steps + skipped}
                   if scale is not None else {}),
                "tokens_per_s": x.numel() * self.world / dt,
                "elapsed": time.perf_counter() - self.t_start,
                "expert_load": [[round(v, 5) for v in row] for row in load]}

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradients of the global batch's mean loss, micro-batch i = rows i::grad_accum; returns the mean
        (loss, ce, aux, z, mtp)."""
        accum, device, amp = self.cfg.grad_accum, self.device, self.amp
        sums = torch.zeros(5, device=device)
        for i in range(accum):
            xb, yb = x[i::accum].to(device), y[i::accum].to(device)
            last = i == accum - 1  # DDP all-reduces the accumulated gradients on the last one only
            with contextlib.nullcontext() if self.dp is None or last else self.fwd.no_sync():
                with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                    o = self.fwd(xb, yb, return_logits=False)  # fused chunked head + CE: no (B, T, vocab) logits
                self.scaler.scale(o.loss / accum).backward()
            sums += torch.stack([o.loss, o.ce_loss, o.aux_loss, o.z_loss, o.mtp_loss]).detach().float() / accum
        return sums

    def _check_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Checked before the optimizer step: nothing is corrupted or saved. (fp16: the scaler skips a step whose
        gradients overflowed; a non-finite loss still stops.)"""
        last = f"Last good checkpoint: {self.history.checkpoint or 'none yet'}"
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss ({loss.item()}) at step {self.step + 1}; stopped without "
                                     f"saving. {last}")
        if not torch.isfinite(grad_norm) and not self.scaler.is_enabled():
            raise FloatingPointError(f"non-finite gradient norm at step {self.step + 1}; stopped without saving. "
                                     f"{last}")

    def record(self, rec: dict) -> None:
        """Keep a step's record: History, metrics.jsonl and the progress bar (train CE, MTP CE, val CE)."""
        self.history.train.append(rec)
        self._append(rec | {"kind": "train"})
        self.bar.update(1)
        post = {"ce": f"{rec['ce']:.3f}", **({"mtp_ce": f"{rec['mtp_ce']:.3f}"} if "mtp_ce" in rec else {}),
                "tok/s": f"{rec['tokens_per_s']:.0f}"}
        if self.history.val:
            post["val_ce"] = f"{self.history.val[-1]['val_loss']:.3f}"
        self.bar.set_postfix(post, refresh=False)

    def _append(self, rec: dict) -> None:
        """One line onto metrics.jsonl (rank 0)."""
        if not self.main:
            return
        try:
            with self.metrics.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as e:
            raise RunWriteError(self._write_failed(self.metrics.name, e)) from None

    def validate(self) -> bool:
        """Validate at this step (once), keep a new best; True when early stopping says stop."""
        history, cfg = self.history, self.cfg
        if history.val and history.val[-1]["step"] == self.step:
            return False
        self.status("validating")
        rows = max(cfg.batch_size, 16)  # no gradients to hold: at least 16 rows per forward
        val_ce, load = evaluate(self.model, self.val_tok, rows, cfg.seq_len, cfg.eval_batches, self.amp)
        rec = {"step": self.step, "val_ce": val_ce, "val_loss": val_ce, "expert_load": load}
        history.val.append(rec)  # every rank evaluates (the same numbers) rather than idling at a barrier
        self._append(rec | {"kind": "val"})
        self.status(None)
        if history.best is None or val_ce < history.best["val_loss"]:
            history.best = {"step": self.step, "val_loss": val_ce}
            self.save(best=True)
        since = sum(r["step"] > history.best["step"] for r in history.val)  # validations without a new best
        return cfg.early_stop > 0 and since >= cfg.early_stop

    def save(self, best: bool = False) -> None:
        """A checkpoint of this step (best=True: as <run>/best); a failed write leaves the earlier ones intact."""
        self.status("saving")
        meta = {"tokenizer": TOKENIZER_NAME, "train_config": self.cfg.to_dict(), "sampler": self.sampler.state_dict(),
                "history": self.history.to_dict(), "token_counts": self.counts}
        if self.main:
            try:
                save_checkpoint(self.out, self.model, step=self.step, optimizer=self.optimizer, scaler=self.scaler,
                                meta=meta, keep=self.cfg.keep, best=best)
            except (OSError, SafetensorError) as e:  # (safetensors reports a full disk as its own error)
                name = "best/" if best else checkpoint_dir(self.out, self.step).name
                raise RunWriteError(self._write_failed(name, e)) from None
        if not best:
            self.history.checkpoint = str(checkpoint_dir(self.out, self.step))
        if self.dp is not None:
            self.dp.barrier()  # the checkpoint is complete before any rank moves on
        self.status(None)

    def _write_failed(self, what: str, e: Exception) -> str:
        """One line: what could not be written and why, what is still on disk, how to go on."""
        why = " ".join((getattr(e, "strerror", None) or str(e)).split())
        kept = [p.name for p in list_checkpoints(self.out)[-1:]] + (["best/"] if best_checkpoint(self.out) else [])
        return (f"could not write {what} in {self.out} at step {self.step}: {why}. The checkpoints saved before are "
                f"intact ({', '.join(kept) or 'none yet'}); free some space, then resume from {self.out} "
                "(resume=..., --resume)")


# --- command line (`python -m dsv3 train`; registered in __main__.py) ---
def add_cli_args(p) -> None:
    """The `train` subcommand's flags; unset flags keep the preset's (or, with --resume, the checkpoint's) values."""
    d = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

    def per_preset(name: str) -> str:  # "(default: tiny 480, 174m 5000)"
        return "default: " + ", ".join(f"{k} {v[name]}" for k, v in TRAIN_PRESETS.items())

    p.add_argument("--preset", choices=list(PRESETS), help="model preset; ignored with --resume (default: tiny)")
    p.add_argument("--resume", metavar="PATH", help="continue from a checkpoint or run folder (phase 2; its best "
                   "with RUN/best) (default: start a new run)")
    p.add_argument("--steps", type=int, help=f"optimizer steps ({per_preset('steps')}; with --resume: additional "
                   f"steps, default {PHASE2_STEPS})")
    p.add_argument("--out", help="run folder for checkpoints and metrics.jsonl (default: checkpoints/<preset>, "
                   "with --resume the resumed run's folder)")
    p.add_argument("--overwrite", action="store_true", default=None, help="delete checkpoints already in --out")
    p.add_argument("--lr", type=float, help=f"peak learning rate ({per_preset('lr')})")
    p.add_argument("--warmup", type=int, help=f"linear warmup steps ({per_preset('warmup')})")
    p.add_argument("--batch-size", type=int, help=f"sequences per optimizer step ({per_preset('batch_size')})")
    p.add_argument("--seq-len", type=int, help=f"tokens per sequence ({per_preset('seq_len')})")
    p.add_argument("--grad-accum", type=int, help=f"micro-batches per optimizer step (default: {d['grad_accum']})")
    p.add_argument("--eval-interval", type=int, help=f"validate every N steps ({per_preset('eval_interval')})")
    p.add_argument("--eval-batches", type=int, help="validation batches per evaluation (default: all)")
    p.add_argument("--early-stop", type=int, metavar="N", help="stop after N validations without a new best "
                   "validation loss (default: 0 = never)")
    p.add_argument("--save-interval", type=int, help=f"save every N steps, 0 = only at the end "
                   f"({per_preset('save_interval')})")
    p.add_argument("--keep", type=int, help=f"step checkpoints to keep, besides best/ (default: {d['keep']})")
    p.add_argument("--dtype", choices=list(DTYPES),
                   help="autocast dtype; fp16 scales the loss (torch.amp.GradScaler); bf16 on CPU needs "
                   "AMX/AVX512-BF16 (default: auto = bf16 where supported, fp16 on older CUDA GPUs, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--seed", type=int, help=f"seed for init and data order (default: {d['seed']})")
    p.add_argument("--corpus", help="UTF-8 text file (default: $DSV3_CORPUS, else Tiny Shakespeare)")
    p.add_argument("--device", help="auto, cpu, cuda, mps, ... (default: auto = cuda, else mps, else cpu)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's, one per core; 1 is faster on a "
                   "machine busy with other jobs)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="stop, validate and save after this long (default: none)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.add_argument("--no-kernels", action="store_true", help="run the plain reference model (dsv3.kernels off)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="ModelConfig override for phase 1, e.g. --set n_layers=2 (repeatable) (default: none)")
    p.add_argument("--mtp-layers", type=int, metavar="D",
                   help="multi-token prediction modules (DeepSeek-V3 §2.2; = --set n_mtp_layers=D) (default: 0)")
    p.add_argument("--mtp-weight", type=float, metavar="LAMBDA",
                   help="weight of the MTP loss (= --set mtp_loss_weight=LAMBDA) (default: 0.3)")


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
    flags = {k: "--" + k.replace("_", "-") for k in vars(args) if k not in ("progress", "set", "func", "command")}
    flags |= {k: FIELD_FLAGS[k] for k in mtp}  # model fields given by a flag of their own, not by --set
    try:
        h = train(resume=args.resume, **over)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (RunInUse, RunWriteError) as e:  # a run folder in use, a full disk: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SettingError as e:  # name the flag, not the field: "--steps must be ...", "--set: dim must be ..."
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        if e.names[0] in model_fields and e.names[0] not in flags:
            raise ValueError(f"--set: {e}") from None
        raise ValueError(e.named(flags.get)) from None
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports for the whole data-parallel run
    print(summary(h))
    return 130 if h.interrupted else 0


def summary(h: History) -> str:
    """The CLI's closing lines: each figure named for what it is (train CE beside val CE; the total as such)."""
    last, val = h.train[-1] if h.train else {}, h.val[-1] if h.val else {}
    nan = float("nan")
    tps = [r["tokens_per_s"] for r in h.train[-50:]]
    how = "interrupted" if h.interrupted else "stopped early" if h.stopped_early else "done"
    mtp = (f"MTP CE {last['mtp_ce']:.4f}, " if "mtp_ce" in last else "")
    terms = "CE + aux + z" + (" + weighted MTP CE" if "mtp" in last else "")
    skipped = f"{h.skipped_steps} steps skipped on fp16 overflow, " if "skipped_steps" in last else ""
    lines = [f"{how}: step {val.get('step')}, train CE {last.get('ce', nan):.4f}, "
             f"val CE {val.get('val_loss', nan):.4f}, {mtp}total loss {last.get('loss', nan):.4f} ({terms}), "
             f"{sum(tps) / max(1, len(tps)):.0f} tokens/s (last {len(tps)} steps), {skipped}"
             f"max/mean expert load {max(h.max_over_mean_load(), default=1.0):.2f}, checkpoint {h.checkpoint}"]
    if h.best:
        lines.append(f"best: step {h.best_step}, val CE {h.best_val_loss:.4f}, checkpoint {Path(h.run_dir) / 'best'}")
    return "\n".join(lines)
