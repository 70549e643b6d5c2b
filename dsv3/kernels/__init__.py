"""Fast paths beside the reference model, and the one switch that turns them all off.

The reference files (layers.py, mla.py, moe.py, model.py) are plain PyTorch. A few of their functions are
marked with `@hook`: a kernel registered with `@replaces(that_function)` may compute the same thing faster
(a hand-written backward, kept buffers, a fused head, a compiled step). A kernel takes the reference's
arguments and returns None where it does not apply (another device, dtype or shape); the reference runs then.

  kernels.enabled()          True unless DSV3_KERNELS=0 is set or a `disabled()` block is active
  with kernels.disabled():   the reference alone: no custom autograd Function, no kept buffer
  --no-kernels               the same switch on `python -m dsv3 train | generate | bench`

The kernels, one file per family, each naming the reference it replaces and tested equal to it under
tests/kernels/:
  linear.py     `layers.linear`          CPU fp32 x @ W^T on oneDNN's GEMM
  attention.py  `mla.attention`          causal attention from MLA's projections with its own backward (CPU);
                                         SDPA's flash kernel with V padded to the q/k head width (elsewhere)
  experts.py    `moe.routed_experts`     tokens sorted by expert, one grouped GEMM per weight
  head.py       `model.head_loss`,       the output head fused with the cross-entropy in row chunks; the tied
                `model.embed_tokens`     embedding's gradient added into the head's
  buffers.py    (used by the above)      buffers kept from step to step instead of fresh allocations
  decode.py     `DeepSeekV3.decode`'s step  the static decoding step (T positions) torch.compile'd
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os

_FAMILIES = ("linear", "attention", "experts", "head")  # the modules that register kernels
_enabled = os.environ.get("DSV3_KERNELS", "1").strip().lower() not in ("0", "false", "off", "no")


def enabled() -> bool:
    """Whether hooked functions may run their kernels (default True; DSV3_KERNELS=0 starts with False)."""
    return _enabled


def set_enabled(on: bool) -> None:
    """Switch the kernels on or off for the whole process (the CLI's --no-kernels)."""
    global _enabled
    _enabled = bool(on)


@contextlib.contextmanager
def disabled():
    """Run the reference model inside this block: every hooked function takes its plain PyTorch path."""
    global _enabled
    prev, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = prev


def hook(reference):
    """Mark a reference function that a kernel may replace. The returned function runs the registered kernels
    in order while kernels are enabled, and the reference when none applies (or when they are off);
    `.reference` is the plain function itself."""
    impls = []

    @functools.wraps(reference)
    def dispatch(*args, **kwargs):
        if _enabled:
            for impl in impls:
                out = impl(*args, **kwargs)
                if out is not None:
                    return out
        return reference(*args, **kwargs)

    dispatch.reference, dispatch.kernels = reference, impls
    return dispatch


def replaces(hooked):
    """Register the decorated function as a kernel for `hooked` (a function made by `hook`)."""

    def register(kernel):
        if kernel not in hooked.kernels:
            hooked.kernels.append(kernel)
        kernel.replaces = hooked.reference
        return kernel

    return register


def load() -> None:
    """Import the kernel families so they register themselves (dsv3/__init__.py does this once)."""
    for name in _FAMILIES:
        importlib.import_module(f"{__name__}.{name}")
