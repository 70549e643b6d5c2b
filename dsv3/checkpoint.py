"""Checkpoints: one folder per saved step inside a run folder, written atomically.

    <run>/step_000200/model.safetensors   weights (tied embedding/head stored once; router biases included)
                      state.pt            optimizer state, torch RNG state, fp16 loss scaler (tensors and numbers)
                      meta.json           format tag, step, model config, tokenizer, train config,
                                          sampler state, python RNG state, metrics so far
    <run>/best/                           the same three files, for the step with the lowest validation loss
A checkpoint is built in a hidden temporary folder (.tmp-*) and renamed into place; one is removed by
renaming it out of the step_* namespace first (.trash-*), then deleting it. So a kill at any moment leaves
every step_* / best folder either complete or absent, and `list_checkpoints` returns complete ones only;
hidden leftovers are cleaned up at the next save. `save_checkpoint` keeps the newest `keep` step folders.
Loading never unpickles code: safetensors for weights, `torch.load(weights_only=True)` for the rest.
`run_lock` keeps a second training out of a run folder while one runs (<run>/train.lock; the kernel drops the
lock when its process ends, crashed or not).
Does not know how training works; it stores what the trainer hands it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from .config import ModelConfig
from .data import counts_tensor
from .model import DeepSeekV3

FORMAT = "dsv3-checkpoint/1"
_STEP_DIR = re.compile(r"^step_(\d+)$")
BEST = "best"  # the best checkpoint's folder name inside a run folder
FILES = ("meta.json", "model.safetensors", "state.pt")  # what every complete checkpoint folder holds
_LEFTOVER = (".tmp-", ".old-", ".trash-")  # hidden folders a kill mid-save or mid-delete can leave behind


LOCK_FILE = "train.lock"  # in a run folder: locked by the training that writes there, holds its pid


class RunInUse(RuntimeError):
    """Another process is training into this run folder."""


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike):
    """Hold <run_dir>/train.lock for the block (an exclusive flock; without fcntl, as on Windows, no lock).
    A second holder, in this process or another, gets RunInUse at once. The file stays; only the lock matters."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            raise RunInUse(f"run folder {run_dir} is in use by another training (pid {holder}); wait for it to end, "
                           "or train into another folder (out=..., --out)") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)  # (releases the lock)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask_mode(*paths: Path) -> None:
    """Give files and folders written under temporary names (mkdtemp makes 0700, safetensors writes 0600) the
    mode a plain open() or mkdir() would have: 0666 / 0777 minus the user's umask."""
    mask = os.umask(0o22)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    for p in paths:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def is_complete(path: str | os.PathLike) -> bool:
    """Whether `path` is a checkpoint folder holding all of its files."""
    path = Path(path)
    return path.is_dir() and all((path / f).is_file() for f in FILES)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete step_* checkpoint folders of a run, oldest first (best/ and partial folders are not listed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def best_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """<run_dir>/best if it is a complete checkpoint, else None."""
    path = Path(run_dir) / BEST
    return path if is_complete(path) else None


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of `step` lives in a run folder: <run_dir>/step_NNNNNN."""
    return Path(run_dir) / f"step_{step:06d}"


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a checkpoint folder: renamed out of its namespace first, so a kill mid-delete leaves no partial one."""
    path = Path(path)
    trash = path.with_name(f".trash-{path.name.lstrip('.')}-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_all(run_dir: str | os.PathLike) -> None:
    """Delete every checkpoint of a run folder (step_*, best/ and leftovers); metrics.jsonl stays."""
    run_dir = Path(run_dir)
    for p in [*list_checkpoints(run_dir), *([run_dir / BEST] if (run_dir / BEST).is_dir() else [])]:
        remove_checkpoint(p)
    clean_leftovers(run_dir)


def clean_leftovers(run_dir: str | os.PathLike) -> None:
    """Finish what a killed save or delete left: drop .tmp-*/.trash-* folders and partial step_*/best folders;
    a complete .old-<name> whose <name> is missing (a kill between the two renames of a re-save) goes back."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for p in sorted(run_dir.iterdir()):
        if not p.is_dir():
            continue
        if p.name.startswith(".old-"):
            target = run_dir / p.name[len(".old-"):]
            if is_complete(p) and not target.exists():
                os.rename(p, target)
                continue
            remove_checkpoint(p)
        elif p.name.startswith(_LEFTOVER):
            shutil.rmtree(p, ignore_errors=True)
        elif (_STEP_DIR.match(p.name) or p.name == BEST) and not is_complete(p):
            remove_checkpoint(p)


def save_checkpoint(run_dir: str | os.PathLike, model: DeepSeekV3, *, step: int, optimizer=None, scaler=None,
                    meta: dict | None = None, keep: int = 3, best: bool = False) -> Path:
    """Write <run_dir>/step_<step> atomically and delete all but the newest `keep` checkpoints.

    best=True writes <run_dir>/best instead (replacing the previous best; step folders are left alone).
    `meta` (JSON-serialisable: train config, sampler state, metrics) is stored in meta.json; the
    torch and python RNG states are captured here. Leftovers of an earlier kill are cleaned up first.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_leftovers(run_dir)
    final = run_dir / BEST if best else checkpoint_dir(run_dir, step)
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".tmp-{final.name}-"))
    try:
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # drops the tied duplicate
        state = {"rng_torch": torch.get_rng_state()}
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        if scaler is not None and scaler.is_enabled():  # fp16 loss scaling: the scale and its growth counter
            state["scaler"] = scaler.state_dict()
        torch.save(state, tmp / "state.pt")
        info = {"format": FORMAT, "step": step, "config": model.cfg.to_dict(),
                "python_rng": _python_rng_to_json(random.getstate()), **(meta or {})}
        (tmp / "meta.json").write_text(json.dumps(info))
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        umask_mode(tmp, *tmp.iterdir())
        if final.exists():  # re-saving (best, or a step again): swap it out; clean_leftovers undoes a half swap
            old = run_dir / f".old-{final.name}"
            os.rename(final, old)
            os.rename(tmp, final)
            _fsync_dir(run_dir)
            remove_checkpoint(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 and not best else []:
        remove_checkpoint(old)
    return final


def copy_checkpoint(src: str | os.PathLike, run_dir: str | os.PathLike, *, best: bool = False) -> Path:
    """Copy a complete checkpoint folder into a run folder (as best/, or as its step_* folder), atomically."""
    src, run_dir = Path(src), Path(run_dir)
    if not is_complete(src):
        raise FileNotFoundError(f"{src} is not a complete checkpoint (needs {', '.join(FILES)})")
    final = run_dir / BEST if best else checkpoint_dir(run_dir, read_meta(src)["step"])
    if final.exists():
        raise FileExistsError(f"{final} already exists")
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".tmp-{final.name}-"))
    try:
        for f in FILES:
            shutil.copyfile(src / f, tmp / f)
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        umask_mode(tmp, *tmp.iterdir())
        os.rename(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _python_rng_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(state) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def resolve_checkpoint(path: str | os.PathLike, best: bool = False) -> Path:
    """A checkpoint folder from a checkpoint folder, a file inside one, or a run folder (its newest).

    best=True: the run's best/ folder (`path` is the run folder, or any checkpoint inside it)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.name in FILES:
            path = path.parent
        else:
            raise ValueError(f"{path} is not a dsv3 checkpoint (expected a run folder or a step_* folder)")
    if best:
        run = path.parent if (path / "meta.json").exists() else path
        found = best_checkpoint(run)
        if found is None:
            raise FileNotFoundError(f"no best checkpoint in {run} (best/ is written at the run's first validation)")
        return found
    if (path / "meta.json").exists():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"no checkpoint (complete step_* folder) in {path}")
    return found[-1]


def read_meta(ckpt: str | os.PathLike) -> dict:
    """meta.json of a checkpoint folder, checked for the format tag."""
    f = Path(ckpt) / "meta.json"
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{f} is missing: {ckpt} is not a complete dsv3 checkpoint") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{f} is corrupt (not valid JSON: {e})") from e
    tag = meta.get("format") if isinstance(meta, dict) else None
    if tag != FORMAT:
        raise ValueError(f"{f} is not a dsv3 checkpoint (format tag {tag!r}, expected {FORMAT!r})")
    return meta


def load_weights(model: DeepSeekV3, ckpt: str | os.PathLike) -> None:
    """Load model.safetensors of `ckpt` into `model`; configs must match."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    # through ModelConfig: fields added since the checkpoint was written (n_mtp_layers, ...) take their defaults
    theirs, ours = ModelConfig.from_dict(meta["config"]).to_dict(), model.cfg.to_dict()
    diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if diff:
        detail = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs model {ours.get(k)!r}" for k in diff)
        raise ValueError(f"checkpoint {ckpt} was saved with another model config ({detail})")
    f = ckpt / "model.safetensors"
    if not f.exists():
        raise FileNotFoundError(f"{f} is missing")
    try:
        load_model(model, str(f), strict=True, device=str(model.embed.weight.device))
    except (SafetensorError, RuntimeError, OSError) as e:
        raise ValueError(f"{f} is corrupt or does not match its config ({type(e).__name__}: {e})") from e


def load_state(ckpt: str | os.PathLike) -> dict:
    """state.pt (optimizer, torch RNG) merged with meta.json, without executing pickled code."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    f = ckpt / "state.pt"
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{f} is missing") from None
    except Exception as e:  # truncated zip, or a pickle that needs code: both refused
        raise ValueError(f"{f} is corrupt or not a dsv3 training state ({type(e).__name__}: {e})") from e
    meta["python_rng"] = _python_rng_from_json(meta["python_rng"])
    return {**meta, **state, "path": str(ckpt)}


def load_checkpoint(path: str | os.PathLike, *, map_location="cpu", with_state: bool = False, best: bool = False):
    """A ready model (eval mode) from a checkpoint or run folder; with_state also returns the training state.

    A run folder gives its newest checkpoint, or with best=True its best/ (lowest validation loss)."""
    ckpt = resolve_checkpoint(path, best=best)
    meta = read_meta(ckpt)
    try:
        cfg = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{ckpt / 'meta.json'} holds no valid model config ({e})") from e
    with torch.device(map_location):
        model = DeepSeekV3(cfg)
    load_weights(model, ckpt)
    if "token_counts" in meta:  # the training split's token counts: speculative decoding's draft vocabulary
        model.token_counts = counts_tensor(meta["token_counts"], cfg.vocab_size)
    model.eval()
    return (model, load_state(ckpt)) if with_state else model
