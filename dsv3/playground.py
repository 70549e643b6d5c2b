"""The generation playground: an ipywidgets app over `dsv3.generate`, shown by notebook 05 and served as a
web page by `python -m dsv3.playground_server` (`make playground`).

  checkpoint_choices(root)  the checkpoints to pick from: $DSV3_CHECKPOINT if set, then for every run folder
                            in `root` (and `root` itself) its best/ when present and its newest step_*;
                            runs newest first
  find_checkpoint(root)     the default of those: $DSV3_CHECKPOINT, else the newest run's best/, else its newest
                            step (None if there is none)
  Playground(model, ...)    title, checkpoint chooser, prompt, sampling settings with their limits written
                            beside them, Generate and Stop, a status line (tokens, tokens/s, elapsed) that
                            updates per token, the text pre-wrapped as it streams, then every token coloured
                            by its top-1 routed expert in a chosen MoE layer (legend with counts)
  show(root)                a Playground on the default checkpoint, or an HTML message saying how to make one
A setting that does not apply says why (the speculative checkbox of a model without MTP layers).
Generation runs in a thread, so the kernel keeps handling clicks while it streams: Stop sets a flag that
`generate(cancel=...)` checks after every token. A value outside its stated range is refused with a message
beside its box, never clamped.
Deliberately not here: sampling, caching and tokenization (generate.py), checkpoint format (checkpoint.py),
serving many visitors (playground_server.py).
"""

from __future__ import annotations

import html
import math
import os
import threading
import time
from pathlib import Path

import ipywidgets as W

from .checkpoint import list_checkpoints, load_checkpoint, read_meta, resolve_checkpoint
from .data import get_tokenizer
from .devices import resolve_device
from .generate import generate
from .model import DeepSeekV3

TITLE = "dsv3 playground"
# one colour per routed expert (tab10 without grey; more experts cycle)
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]
HOW_TO_TRAIN = ("Train one first: run notebooks/03_phase1_training.ipynb, or on the command line "
                "<code>python -m dsv3 train --preset tiny</code>; or point <code>DSV3_CHECKPOINT</code> at a "
                "checkpoint folder.")
SPECULATIVE_ON = "speculative decoding (the model's MTP draft)"
SPECULATIVE_OFF = "speculative decoding: off, this model has no MTP layers (train with --mtp-layers 1)"
FINISH = {"eot": "end of text", "length": "max new tokens reached", "stop": "stop string", "cancelled": "stopped"}
TEXT_CSS = ("white-space:pre-wrap;overflow-wrap:anywhere;font-family:var(--jp-code-font-family,monospace);"
            "font-size:13px;line-height:1.45")


def _esc(text: str) -> str:
    return html.escape(text)


def _runs(root: Path) -> list[Path]:
    return [root] + sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def checkpoint_choices(root: str | os.PathLike = "checkpoints") -> list[tuple[str, Path]]:
    """(label, folder) of every checkpoint worth offering, the default first.

    $DSV3_CHECKPOINT (a checkpoint or run folder) if set; then per run folder directly in `root` (or `root`
    itself) its best/ (the lowest validation loss) when that exists, then its newest complete step_*; the runs
    ordered newest first (by their newest meta.json). So the default is the newest run's best checkpoint, not a
    step that may have overfitted (or a 1-step test run's only step when it has no best/)."""
    found: list[tuple[str, Path]] = []
    env = os.environ.get("DSV3_CHECKPOINT")
    if env:
        ckpt = resolve_checkpoint(env)
        found.append((f"{ckpt.parent.name}/{ckpt.name} ($DSV3_CHECKPOINT)", ckpt))
    root = Path(root)
    if not root.is_dir():
        return found
    runs = []
    for run in _runs(root):
        cands = []
        for c in ([run / "best"] if (run / "best" / "meta.json").is_file() else []) + list_checkpoints(run)[-1:]:
            label = f"{run.name}/{c.name}" if run != root else c.name
            if c.name == "best":
                try:
                    label += f" (step {read_meta(c)['step']})"
                except (OSError, ValueError, KeyError):
                    continue  # not a readable checkpoint: not offered
            cands.append((label, c))
        if cands:
            runs.append((max((c / "meta.json").stat().st_mtime for _, c in cands), cands))
    seen = {c.resolve() for _, c in found}
    found += [(label, c) for _, cands in sorted(runs, key=lambda r: -r[0]) for label, c in cands
              if c.resolve() not in seen]
    return found


def find_checkpoint(root: str | os.PathLike = "checkpoints") -> Path | None:
    """$DSV3_CHECKPOINT if set (a step_* folder or a run folder), else the newest run's best/, else its newest
    step_* (runs: `root` and every run folder directly inside it); None when there is none."""
    choices = checkpoint_choices(root)
    return choices[0][1] if choices else None


class Playground:
    """The widgets, the Generate / Stop handlers and the checkpoint chooser for one loaded model."""

    def __init__(self, model: DeepSeekV3, *, choices: list[tuple[str, Path]] | None = None, device: str = "cpu"):
        self.choices, self.device = choices or [], device
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.generation = None  # the last dsv3 Generation (text, tokens, routing)
        self._make_widgets()
        self.widget = self._layout()
        self._wire()
        self.set_model(model)

    def _make_widgets(self) -> None:
        """Every input and output widget, each with a CSS class (the browser test finds them by it)."""
        self.heading = W.HTML(f"<h2 style='margin:0 0 2px 0'>{TITLE}</h2>")
        self.info = W.HTML()
        self.checkpoint = W.Dropdown(options=[(lbl, i) for i, (lbl, _) in enumerate(self.choices)],
                                     value=0 if self.choices else None, layout=W.Layout(width="420px"))
        self.prompt = W.Textarea(value="ROMEO:", placeholder="Type a prompt", layout=W.Layout(width="99%",
                                                                                            height="70px"))
        box = W.Layout(width="130px")
        self.max_new_tokens = W.IntText(value=100, layout=box)
        self.temperature = W.FloatText(value=0.8, step=0.05, layout=box)
        self.top_k = W.IntText(value=50, layout=box)
        self.top_p = W.FloatText(value=0.95, step=0.01, layout=box)
        self.seed = W.IntText(value=123, layout=box)
        # a checkbox's description is cut at a fixed width unless it may take what it needs
        whole = dict(indent=False, layout=W.Layout(width="auto"), style={"description_width": "initial"})
        # compile=True of dsv3.generate: the same text, faster per token after a first run that compiles
        self.compile = W.Checkbox(value=False, description="compiled decoding (the first run compiles)", **whole)
        # speculative=True of dsv3.generate: the MTP modules draft, the model verifies (same greedy text)
        self.speculative = W.Checkbox(value=False, description=SPECULATIVE_ON, **whole)
        self.button = W.Button(description="Generate", button_style="primary", tooltip="Generate (streams)")
        self.stop_button = W.Button(description="Stop", disabled=True, button_style="warning",
                                    tooltip="End the generation now")
        self.status = W.HTML()
        self.output = W.HTML(layout=W.Layout(width="99%", min_height="48px", border="1px solid #ddd",
                                             padding="4px 8px"))
        self.layer = W.Dropdown(layout=W.Layout(width="170px"))
        self.legend = W.HTML(layout=W.Layout(flex="1 1 auto"))
        self.hints = {name: W.HTML() for name in ("prompt", "max_new_tokens", "temperature", "top_k", "top_p",
                                                  "seed")}
        for w, cls in [(self.heading, "gen-title"), (self.info, "gen-info"), (self.checkpoint, "gen-checkpoint"),
                       (self.prompt, "gen-prompt"), (self.max_new_tokens, "gen-max-tokens"),
                       (self.temperature, "gen-temperature"), (self.top_k, "gen-top-k"), (self.top_p, "gen-top-p"),
                       (self.seed, "gen-seed"), (self.layer, "gen-layer"), (self.compile, "gen-compile"),
                       (self.speculative, "gen-speculative"), (self.button, "gen-button"),
                       (self.stop_button, "gen-stop"), (self.status, "gen-status"),
                       (self.output, "gen-output"), (self.legend, "gen-legend")]:
            w.add_class(cls)
        for name, hint in self.hints.items():
            hint.add_class(f"gen-hint-{name.replace('_', '-')}")

    def _layout(self) -> W.VBox:
        """The page: title, model line, chooser, prompt, settings with their hints, buttons and status, text, legend."""
        label = W.Layout(min_width="140px", width="auto", flex="0 0 auto")  # at least 140px, never cut

        def row(text, widget, hint):
            return W.HBox([W.Label(text, layout=label).add_class("gen-label"), widget, hint],
                          layout=W.Layout(align_items="center"))

        settings = W.VBox([row("max new tokens", self.max_new_tokens, self.hints["max_new_tokens"]),
                           row("temperature", self.temperature, self.hints["temperature"]),
                           row("top-k", self.top_k, self.hints["top_k"]),
                           row("top-p", self.top_p, self.hints["top_p"]),
                           row("seed", self.seed, self.hints["seed"]), self.compile, self.speculative])
        parts = [self.heading, self.info]
        if self.choices:
            parts.append(row("checkpoint", self.checkpoint, W.HTML()))
        parts += [self.prompt, self.hints["prompt"], settings,
                  W.HBox([self.button, self.stop_button, self.status], layout=W.Layout(align_items="center")),
                  self.output, row("colour by expert of", self.layer, self.legend)]
        end = os.environ.get("DSV3_PLAYGROUND_SESSION_END", "")  # set by playground_server for its kernels
        if end.isdigit() and int(end) > 0:
            parts.append(W.HTML(f"<span style='color:#888;font-size:12px'>This page's session ends after "
                                f"{int(end) // 60 or 1} min without use: reload the page to start a new one."
                                f"</span>").add_class("gen-session-note"))
        widget = W.VBox(parts, layout=W.Layout(max_width="980px"))
        widget.add_class("gen-app")
        return widget

    def _wire(self) -> None:
        self.button.on_click(self.on_generate)
        self.stop_button.on_click(self.on_stop)
        self.layer.observe(lambda _: self.show_text(), names="value")
        self.checkpoint.observe(self._on_checkpoint, names="value")
        for w in (self.prompt, self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.seed):
            w.observe(lambda _: self.settings(), names="value")

    def _repr_mimebundle_(self, **kwargs):  # a notebook cell ending in a Playground shows its widget
        return self.widget._repr_mimebundle_(**kwargs)

    # --- the model ---

    def set_model(self, model: DeepSeekV3, name: str = "") -> None:
        self.model = model.eval()
        cfg = model.cfg
        self.n_moe = len(model.moe_layers())
        if not name and self.choices and self.checkpoint.value is not None:
            name = self.choices[self.checkpoint.value][0]
        self.info.value = (f"<span style='color:#555'>{'<code>' + _esc(name) + '</code> · ' if name else ''}"
                           f"{cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_routed_experts} routed experts, "
                           f"context {cfg.max_seq_len} tokens · on {self.device}</span>")
        self.compile.disabled = cfg.attn != "mla"
        self.speculative.disabled = not cfg.n_mtp_layers  # a model trained with --mtp-layers
        self.speculative.value = self.speculative.value and not self.speculative.disabled
        self.speculative.description = SPECULATIVE_OFF if self.speculative.disabled else SPECULATIVE_ON
        self.generation = None
        self.layer.options = [("off", -1)] + [(f"MoE layer {i}", i) for i in range(self.n_moe)]
        self.layer.value = self.n_moe - 1
        self.output.value = self.legend.value = self.status.value = ""
        self.settings()

    def _on_checkpoint(self, change) -> None:
        if change["new"] is None:
            return
        label, path = self.choices[change["new"]]
        self._busy(True, stoppable=False)
        self.status.value = f"loading <code>{_esc(label)}</code>…"
        self.model = None  # free the old weights before loading the new ones
        try:
            self.set_model(load_checkpoint(path, map_location=self.device), label)
        except (FileNotFoundError, ValueError) as e:
            self.checkpoint.value = change["old"]  # back to the previous one (this handler reloads it)
            self.status.value = f"<span style='color:#c00'>could not load {_esc(label)}: {_esc(str(e))}</span>"
        finally:
            self._busy(False)

    # --- settings: each one's range is written beside it; a value outside is reported there, never clamped ---

    def settings(self) -> dict | None:
        """The generation settings if every one is in range (else None, each problem shown beside its box)."""
        if getattr(self, "model", None) is None:
            return None
        cfg = self.model.cfg
        L, V = cfg.max_seq_len, cfg.vocab_size
        n_prompt = len(get_tokenizer().encode_ordinary(self.prompt.value)) or 1  # empty: starts from <|endoftext|>
        room = L - n_prompt
        n, t, k, p, s = (w.value for w in (self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.seed))
        errors = {
            "prompt": room < 1 and f"too long: {n_prompt} tokens, at most {L - 1} for this model",
            "max_new_tokens": (not 1 <= n <= L - 1 and f"{n} is out of range: 1-{L - 1} for this model")
            or (n > room > 0 and f"{n} does not fit: the prompt is {n_prompt} tokens, so at most {room} "
                f"(context {L})"),
            "temperature": not (math.isfinite(t) and t >= 0) and f"{t} is out of range: must be ≥ 0",
            "top_k": not 0 <= k <= V and f"{k} is out of range: 0-{V}",
            "top_p": not (0 < p <= 1) and f"{p} is out of range: 0 < top-p ≤ 1",
            "seed": not 0 <= s < 2**63 and f"{s} is out of range: must be ≥ 0",
        }
        help_text = {
            "prompt": f"{n_prompt} tokens (at most {L - 1} for this model)",
            "max_new_tokens": f"1-{L - 1} for this model (prompt + new tokens ≤ {L})",
            "temperature": "≥ 0 (0 = greedy; higher = more random)",
            "top_k": f"0-{V}: sample from the k most likely tokens (0 = off)",
            "top_p": "0 < p ≤ 1: the smallest set of tokens reaching probability p (1 = off)",
            "seed": "≥ 0: the same seed gives the same text",
        }
        for name, hint in self.hints.items():
            msg = errors[name]
            hint.value = (f"<span style='color:#c00;font-weight:600'>{_esc(msg)}</span>" if msg
                          else f"<span style='color:#666'>{_esc(help_text[name])}</span>")
        if any(errors.values()):
            return None
        return dict(max_new_tokens=n, temperature=t, top_k=k, top_p=p, seed=s, compile=self.compile.value,
                    speculative=self.speculative.value)

    # --- generating ---

    def _busy(self, on: bool, stoppable: bool = True) -> None:
        self.button.disabled = self.checkpoint.disabled = on
        self.stop_button.disabled = not (on and stoppable)

    def on_generate(self, _button=None) -> None:
        """Start a generation in a thread (the kernel stays free for Stop); refused while one runs."""
        if self._thread is not None and self._thread.is_alive():
            return
        settings = self.settings()
        if settings is None:
            self.status.value = "<span style='color:#c00'>fix the settings marked in red</span>"
            return
        self._stop.clear()
        self._busy(True)
        self._thread = threading.Thread(target=self._generate, args=(self.prompt.value, settings), daemon=True)
        self._thread.start()

    def on_stop(self, _button=None) -> None:
        self._stop.set()  # `generate` ends after the token in progress

    def join(self, timeout: float | None = None) -> None:
        """Wait for the running generation (tests and notebooks)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _generate(self, prompt: str, settings: dict) -> None:
        try:
            self.run(prompt, **settings)
        except ValueError as e:  # settings the checks above cannot see: say so, no trace
            self.status.value = f"<span style='color:#c00'>error: {_esc(str(e))}</span>"
        except Exception as e:  # a thread's exception would vanish: show it
            self.status.value = f"<span style='color:#c00'>failed: {type(e).__name__}: {_esc(str(e))}</span>"
        finally:
            self._busy(False)

    def run(self, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int,
            compile: bool = False, speculative: bool = False):
        """Generate from `prompt` in this thread, streaming into `output` and `status`; return the Generation."""
        self.generation = None
        self.legend.value = ""
        head = f"<b>{_esc(prompt)}</b>"
        self.output.value = f"<div class='gen-text' style='{TEXT_CSS}'>{head}</div>"
        start, count = time.perf_counter(), 0

        def status(state: str) -> str:
            elapsed = time.perf_counter() - start
            rate = f"{count / elapsed:.1f}" if elapsed > 0 else "-"
            return f"{state} · {count} tokens · {rate} tokens/s · {elapsed:.1f} s"

        def on_text(text: str) -> None:
            nonlocal count
            count += 1
            self.output.value = f"<div class='gen-text' style='{TEXT_CSS}'>{head}{_esc(text)}</div>"
            self.status.value = status("generating")

        self.status.value = status("generating")
        g = generate(self.model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                     seed=seed, return_trace=True, on_text=on_text, compile=compile, cancel=self._stop.is_set,
                     speculative=speculative)
        count = len(g.tokens) - g.n_prompt
        self.status.value = status(FINISH.get(g.finish_reason, g.finish_reason))
        if speculative and g.drafted:
            self.status.value += f" · drafts accepted {g.acceptance_text(0)}, draft vocabulary {g.draft_vocab:,}"
        self.generation = g
        self.show_text()
        return g

    def show_text(self) -> None:
        """The last generation, each token coloured by its top-1 expert in the chosen MoE layer (or plain)."""
        g = self.generation
        if g is None:
            return
        layer = self.layer.value
        if layer is None or layer < 0 or not self.n_moe:
            body = f"<b>{_esc(''.join(g.token_texts[:g.n_prompt]))}</b>{_esc(g.text)}"
            self.output.value, self.legend.value = f"<div class='gen-text' style='{TEXT_CSS}'>{body}</div>", ""
            return
        experts = g.top_experts()[layer].tolist()
        spans = []
        for i, (t, e) in enumerate(zip(g.token_texts, experts, strict=True)):
            c = PALETTE[e % len(PALETTE)]
            bold = "font-weight:bold;" if i < g.n_prompt else ""
            spans.append(f"<span title='expert {e}' style='{bold}background:{c}2e;border-bottom:2px solid {c}'>"
                         f"{_esc(t) or '&#8203;'}</span>")
        self.output.value = f"<div class='gen-text' style='{TEXT_CSS}'>{''.join(spans)}</div>"
        counts = [experts.count(e) for e in range(self.model.cfg.n_routed_experts)]
        self.legend.value = " ".join(
            f"<span title='{n} tokens' style='background:{PALETTE[e % len(PALETTE)]};color:white;padding:0 5px;"
            f"border-radius:3px;font-size:12px;white-space:nowrap;display:inline-block;margin:1px 0'>"
            f"expert {e}: {n}</span>" for e, n in enumerate(counts))


def show(root: str | os.PathLike = "checkpoints", device: str | None = None) -> Playground | W.HTML:
    """A Playground on the default checkpoint (the chooser offers the others), or an HTML widget that says
    there is none and how to make one."""
    try:
        choices = checkpoint_choices(root)
    except (FileNotFoundError, ValueError) as e:
        return W.HTML(f"<b>Could not use DSV3_CHECKPOINT</b>: {_esc(str(e))}. {HOW_TO_TRAIN}").add_class("gen-status")
    if not choices:
        return W.HTML(f"<h2>{TITLE}</h2><b>No checkpoint found</b> (looked in <code>{_esc(Path(root).name)}/"
                      f"</code>). {HOW_TO_TRAIN}").add_class("gen-status")
    device = str(resolve_device(device))  # None / "auto": CUDA, then MPS, then the CPU
    return Playground(load_checkpoint(choices[0][1], map_location=device), choices=choices, device=device)
