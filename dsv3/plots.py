"""Figures for the notebooks: matplotlib in, numbers out of the caller.

Every function takes plain data (lists, arrays, tensors, a training history), draws one figure,
saves it when given a `path`, and returns the `Figure`. Nothing here trains, loads or measures:
the notebooks measure, these functions only draw. Functions use `pyplot` so a notebook shows the
figure at the end of the cell; call `plt.close(fig)` in scripts.

  kv_cache_bars      bytes per cached token for several attention variants    (figures/mla_kv_cache.png)
  router_balance     expert load per step per expert + max/mean balance        (figures/router_balance.png)
  loss_curves        train / validation loss over steps                        (figures/phase1_loss.png)
  expert_usage       share of routed slots per expert, per layer, over steps   (figures/expert_usage.png)
  phase_curves       two training phases as one curve, with the LR schedule    (figures/phase2_loss.png)
                     and where the best checkpoint (lowest validation loss) was taken
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np


def _save(fig, path: str | Path | None):
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def _array(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


def balance_ratio(loads) -> np.ndarray:
    """max load / mean load over the last axis (experts): 1 = perfectly balanced, N = one expert takes all."""
    a = _array(loads)
    return a.max(axis=-1) / np.maximum(a.mean(axis=-1), 1e-12)


def kv_cache_bars(names: Sequence[str], bytes_per_token: Sequence[float], *, title: str | None = None,
                  path: str | Path | None = None):
    """Bar chart of KV-cache bytes per token (one bar per attention variant), labelled with the values."""
    values = [float(v) for v in bytes_per_token]
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    labels = [n.replace(" (", "\n(", 1).replace(": ", ":\n") for n in names]  # long names wrap below the bar
    bars = ax.bar(labels, values, color=["#9e9e9e", "#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(values)])
    for b, v in zip(bars, values, strict=True):
        ax.annotate(f"{v:,.0f} B", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom",
                    xytext=(0, 2), textcoords="offset points", fontsize=9)
    ax.set_ylabel("KV cache per token (bytes, all layers)")
    ax.set_ylim(0, max(values) * 1.15)
    ax.set_title(title or "KV-cache size per token")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def router_balance(runs: Mapping[str, object], *, layer: int = -1, path: str | Path | None = None):
    """Top: per run, the share of routed slots per expert at every step in one MoE layer (`layer`).
    Bottom: the balance metric max load / mean load per step, averaged over all MoE layers.

    `runs` maps a run's name to its expert loads shaped (steps, moe_layers, experts), e.g.
    `History.expert_load_fractions()`.
    """
    names = list(runs)
    loads = [_array(runs[n]) for n in names]
    shares = [a / np.maximum(a.sum(-1, keepdims=True), 1e-12) for a in loads]
    n_layers = loads[0].shape[1]
    fig = plt.figure(figsize=(3.0 * len(names) + 1, 6.2))
    grid = fig.add_gridspec(2, len(names), height_ratios=[1.2, 1], hspace=0.45)
    vmax = max(float(s[:, layer].max()) for s in shares)
    for i, (name, s) in enumerate(zip(names, shares, strict=True)):
        ax = fig.add_subplot(grid[0, i])
        im = ax.imshow(s[:, layer].T, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=vmax,
                       interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        if i == 0:
            ax.set_ylabel(f"expert (MoE layer {layer % n_layers})")
    top = fig.axes[: len(names)]
    fig.colorbar(im, ax=top, label="share of slots", pad=0.02)
    ax = fig.add_subplot(grid[1, :])
    for name, a in zip(names, loads, strict=True):
        ax.plot(np.arange(1, len(a) + 1), balance_ratio(a).mean(axis=1), label=name)
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("max load / mean load")
    ax.set_title(f"expert balance, mean over {n_layers} MoE layers (1 = uniform)", fontsize=10)
    ax.legend(fontsize=8, ncol=len(names))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _mark_best(ax, best) -> None:
    """A star on the validation curve at best = (step, val_loss): where the best checkpoint was taken."""
    if best is not None:
        step, loss = float(best[0]), float(best[1])
        ax.plot([step], [loss], "*", ms=14, color="#c44e52", zorder=5, label=f"best checkpoint (step {step:.0f})")


def loss_curves(steps, train_loss, val_steps=None, val_loss=None, *, best=None, title: str | None = None,
                path: str | Path | None = None):
    """Training loss per step and (optionally) validation loss at its evaluation steps; best = (step, val_loss)
    marks where the best checkpoint was taken (e.g. `History.best_step, History.best_val_loss`)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot(_array(steps), _array(train_loss), lw=1, alpha=0.8, label="train")
    if val_steps is not None and len(val_steps):
        ax.plot(_array(val_steps), _array(val_loss), "o-", ms=4, label="validation")
    _mark_best(ax, best)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def expert_usage(steps, loads, *, path: str | Path | None = None):
    """Heatmaps (one per MoE layer) of each expert's share of routed slots over training.

    `loads` is shaped (steps, layers, experts); `steps` labels its first axis.
    """
    a = _array(loads)
    steps = _array(steps)
    n_layers = a.shape[1]
    share = a / np.maximum(a.sum(-1, keepdims=True), 1e-12)
    fig, axes = plt.subplots(1, n_layers, figsize=(2.6 * n_layers + 1, 3.2), sharey=True, squeeze=False)
    extent = [steps[0], steps[-1], -0.5, a.shape[2] - 0.5]
    for i, ax in enumerate(axes[0]):
        im = ax.imshow(share[:, i].T, aspect="auto", origin="lower", cmap="viridis", vmin=0,
                       vmax=float(share.max()), extent=extent, interpolation="nearest")
        ax.set_title(f"MoE layer {i}", fontsize=10)
        ax.set_xlabel("step")
    axes[0, 0].set_ylabel("expert")
    fig.colorbar(im, ax=axes[0].tolist(), label="share of routed slots", pad=0.02)
    return _save(fig, path)


def phase_curves(phase1: tuple, phase2: tuple, lr: tuple | None = None, *, best=None,
                 path: str | Path | None = None):
    """Two phases of training on one step axis, with the learning rate on a second axis.

    phase1, phase2: (steps, loss) each, optionally (steps, loss, val_steps, val_loss); lr: (steps, lr);
    best: (step, val_loss) of the best checkpoint, marked with a star.
    """
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    for name, ph, c in (("phase 1", phase1, "#4c72b0"), ("phase 2 (resumed)", phase2, "#dd8452")):
        ax.plot(_array(ph[0]), _array(ph[1]), lw=1, color=c, label=f"{name} train")
        if len(ph) == 4 and len(ph[2]):
            ax.plot(_array(ph[2]), _array(ph[3]), "o--", ms=4, color=c, label=f"{name} validation")
    _mark_best(ax, best)
    ax.axvline(float(_array(phase2[0])[0]) - 0.5, color="k", lw=0.8, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    if lr is not None:
        ax2 = ax.twinx()
        ax2.plot(_array(lr[0]), _array(lr[1]), color="#55a868", lw=1, alpha=0.7, label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8)
    else:
        ax.legend(fontsize=8)
    ax.set_title("phase 1 + resumed phase 2")
    fig.tight_layout()
    return _save(fig, path)
