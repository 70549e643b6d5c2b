"""The generation playground: an ipywidgets UI over `dsv3.generate`, shown by notebook 05 (and by Voilà).

  find_checkpoint(root)  the newest checkpoint: $DSV3_CHECKPOINT if set, else the newest step_* folder in
                         `root` or its run folders (None if there is none)
  Playground(model)      prompt box, max new tokens (bounded), temperature, top-k, top-p, seed, compiled
                         decoding (off by default: the first run compiles), Generate;
                         the text streams in token by token; then a routing view colours every token by
                         its top-1 expert in a chosen MoE layer, with a legend
  show(root)             a Playground for the newest checkpoint, or an HTML message that says no
                         checkpoint exists and how to make one (both display as the last value of a cell)
Generation (`dsv3.generate` with its routing trace) runs in the button's handler (it blocks the kernel;
each update reaches the page at once).
Deliberately not here: sampling, caching and tokenization (generate.py), checkpoint format (checkpoint.py).
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import ipywidgets as W
import torch

from .checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint
from .generate import generate
from .model import DeepSeekV3

MAX_NEW_TOKENS = 500  # upper bound of the UI's "max new tokens" box (also capped by the model's max_seq_len)
# one colour per routed expert (tab10 without grey; more experts cycle)
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]
HOW_TO_TRAIN = ("Train one first: run notebooks/03_phase1_training.ipynb, or on the command line "
                "<code>python -m dsv3 train --preset tiny</code>; or point <code>DSV3_CHECKPOINT</code> at a "
                "checkpoint folder.")


def find_checkpoint(root: str | os.PathLike = "checkpoints") -> Path | None:
    """$DSV3_CHECKPOINT if set (a step_* folder or a run folder), else the most recently written step_*
    folder in `root` or in any run folder directly inside it; None when there is none."""
    env = os.environ.get("DSV3_CHECKPOINT")
    if env:
        return resolve_checkpoint(env)
    root = Path(root)
    if not root.is_dir():
        return None
    found = list_checkpoints(root) + [c for run in root.iterdir() if run.is_dir() for c in list_checkpoints(run)]
    return max(found, key=lambda p: (p / "meta.json").stat().st_mtime, default=None)


def _esc(text: str) -> str:
    return html.escape(text).replace("\n", "<br>")


class Playground:
    """The widgets and the Generate handler for one loaded model."""

    def __init__(self, model: DeepSeekV3, title: str = ""):
        self.model = model.eval()
        cfg = model.cfg
        self.n_moe = len(model.moe_layers())
        style, wide = {"description_width": "110px"}, W.Layout(width="330px")
        self.prompt = W.Textarea(value="ROMEO:", placeholder="Type a prompt", description="prompt",
                                 layout=W.Layout(width="99%", height="80px"), style=style)
        self.max_new_tokens = W.BoundedIntText(value=min(100, cfg.max_seq_len - 1), min=1,
                                               max=min(MAX_NEW_TOKENS, cfg.max_seq_len - 1),
                                               description="max new tokens", style=style, layout=wide)
        self.temperature = W.BoundedFloatText(value=0.8, min=0.0, max=2.0, step=0.05, description="temperature",
                                              style=style, layout=wide)
        self.top_k = W.BoundedIntText(value=50, min=0, max=cfg.vocab_size, description="top-k (0 = off)",
                                      style=style, layout=wide)
        self.top_p = W.BoundedFloatText(value=0.95, min=0.01, max=1.0, step=0.01, description="top-p (1 = off)",
                                        style=style, layout=wide)
        self.seed = W.BoundedIntText(value=123, min=0, max=2**31 - 1, description="seed", style=style, layout=wide)
        self.layer = W.Dropdown(options=[(f"MoE layer {i}", i) for i in range(self.n_moe)], value=self.n_moe - 1
                                if self.n_moe else None, description="routing of", style=style, layout=wide)
        # compile=True of dsv3.generate: the same text, faster per token after a first run that compiles
        self.compile = W.Checkbox(value=False, description="compiled decoding (the first run compiles)",
                                  disabled=cfg.attn != "mla", indent=False, layout=wide)
        self.button = W.Button(description="Generate", button_style="primary", icon="play")
        self.status = W.HTML(value=title)
        self.output = W.HTML(value="", layout=W.Layout(width="99%", min_height="60px", border="1px solid #ddd",
                                                        padding="6px"))
        self.routing = W.HTML(value="", layout=W.Layout(width="99%"))
        for w, cls in [(self.prompt, "gen-prompt"), (self.max_new_tokens, "gen-max-tokens"),
                       (self.temperature, "gen-temperature"), (self.top_k, "gen-top-k"), (self.top_p, "gen-top-p"),
                       (self.seed, "gen-seed"), (self.layer, "gen-layer"), (self.compile, "gen-compile"),
                       (self.button, "gen-button"),
                       (self.status, "gen-status"), (self.output, "gen-output"), (self.routing, "gen-routing")]:
            w.add_class(cls)
        self.button.on_click(self.on_generate)
        self.layer.observe(lambda _: self.show_routing(), names="value")
        self.tokens: list[str] = []  # per-token texts of the last generation (prompt first)
        self.top1: torch.Tensor | None = None  # (n_moe, tokens) top-1 expert ids of the last generation
        controls = W.HBox([W.VBox([self.max_new_tokens, self.temperature, self.seed]),
                           W.VBox([self.top_k, self.top_p, self.layer])])
        self.widget = W.VBox([self.status, self.prompt, controls, self.compile, self.button, self.output,
                              self.routing])

    def _repr_mimebundle_(self, **kwargs):  # a notebook cell ending in a Playground shows its widget
        return self.widget._repr_mimebundle_(**kwargs)

    def on_generate(self, _button=None) -> None:
        self.button.disabled = True
        try:
            self.run(self.prompt.value)
        except ValueError as e:  # bad settings (e.g. prompt + max new tokens > max_seq_len): say so, no trace
            self.output.value = f"<span style='color:#c00'>error: {_esc(str(e))}</span>"
        finally:
            self.button.disabled = False

    def run(self, prompt: str) -> str:
        """Generate from `prompt` with the widgets' settings, streaming into `output`; return the new text."""
        head = f"<b>{_esc(prompt)}</b>"
        self.routing.value = ""
        self.output.value = head

        def show_text(text: str) -> None:
            self.output.value = head + _esc(text)

        g = generate(self.model, prompt, self.max_new_tokens.value, temperature=self.temperature.value,
                     top_k=self.top_k.value, top_p=self.top_p.value, seed=self.seed.value, return_trace=True,
                     on_text=show_text, compile=self.compile.value)
        show_text(g.text)
        if self.n_moe:
            self.tokens, self.top1 = g.token_texts, g.top_experts()
            self.show_routing()
        return g.text

    def show_routing(self) -> None:
        if self.top1 is None or self.layer.value is None:
            return
        experts = self.top1[self.layer.value].tolist()
        spans = "".join(
            f"<span title='expert {e}' style='background:{PALETTE[e % len(PALETTE)]}33;"
            f"border-bottom:3px solid {PALETTE[e % len(PALETTE)]};margin-right:1px'>{_esc(t) or '&#8203;'}</span>"
            for t, e in zip(self.tokens, experts, strict=True))
        legend = " ".join(f"<span style='background:{PALETTE[e % len(PALETTE)]};color:white;padding:0 6px;"
                          f"border-radius:3px'>expert {e}</span>" for e in range(self.model.cfg.n_routed_experts))
        self.routing.value = (f"<div><b>top-1 routed expert per token, MoE layer {self.layer.value}</b> "
                              f"(hover a token for its expert)</div><div style='line-height:1.9'>{spans}</div>"
                              f"<div style='margin-top:4px'>{legend}</div>")


def show(root: str | os.PathLike = "checkpoints", device: str | None = None) -> Playground | W.HTML:
    """A Playground for the newest checkpoint, or an HTML widget that explains that there is none."""
    try:
        ckpt = find_checkpoint(root)
    except (FileNotFoundError, ValueError) as e:
        return W.HTML(f"<b>Could not use DSV3_CHECKPOINT</b>: {_esc(str(e))}. {HOW_TO_TRAIN}").add_class("gen-status")
    if ckpt is None:
        return W.HTML(f"<b>No checkpoint found</b> (looked in <code>{_esc(Path(root).name)}/</code>). "
                      f"{HOW_TO_TRAIN}").add_class("gen-status")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_checkpoint(ckpt, map_location=device)
    title = (f"Loaded <code>{_esc(ckpt.parent.name)}/{_esc(ckpt.name)}</code>: "
             f"{model.cfg.n_layers} layers, dim {model.cfg.dim}, on {device}.")
    return Playground(model, title)
