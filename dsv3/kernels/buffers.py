"""Buffers kept from call to call for the CPU kernels (`workspace`), and `KeptGradCast`, a weight cast whose
gradient lands in such a buffer.

Why: a fresh tensor of a few MB or more costs a page fault per 4 KB on the CPU, since the C allocator hands
blocks that large back to the operating system when they are freed. A kept buffer is faulted in once.
No reference function corresponds to this file: the kernels in attention.py, head.py and experts.py use it.
"""

from __future__ import annotations

import threading

import torch
from torch.utils.weak import WeakIdKeyDictionary

_WORKSPACE = threading.local()  # per thread: owner -> {(name, dtype): buffer}, freed with the owner


def workspace(owner, name, shape, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised buffer kept for `owner` (any object: a weight, a class) from call to call, per thread.
    It is handed out again only when nothing else holds its storage (a gradient still alive as a .grad, or a
    tensor saved for a backward still to run); otherwise a fresh one is made, and kept instead. One buffer per
    name and dtype, so steps that alternate fp32 and bf16 each keep their own."""
    if not hasattr(_WORKSPACE, "by_owner"):
        _WORKSPACE.by_owner = WeakIdKeyDictionary()
    bufs = _WORKSPACE.by_owner.setdefault(owner, {})
    t = bufs.get((name, dtype))
    # a buffer made under torch.inference_mode cannot be written outside it (generate(), then a no_grad forward);
    # two references: the kept tensor and the temporary storage object made for the count
    if (t is None or t.shape != shape or t.device != torch.device(device)
            or (t.is_inference() and not torch.is_inference_mode_enabled())
            or torch._C._storage_Use_Count(t.untyped_storage()._cdata) > 2):
        t = bufs[name, dtype] = torch.empty(shape, dtype=dtype, device=device)
    return t


class KeptGradCast(torch.autograd.Function):
    """w.to(dtype) whose backward writes w's gradient, in w's dtype, into a buffer kept for w (`workspace`)
    instead of a fresh tensor. Used for the routed experts' stacked weights under CPU bf16 autocast.
    `apply(w, dtype)` with dtype != w.dtype."""

    @staticmethod
    def forward(ctx, w, dtype):
        ctx.w = w  # the buffer's owner (a parameter: no reference cycle through the graph)
        return w.to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        w = ctx.w
        # a fresh view of the kept buffer: autograd takes it as w.grad without a copy
        return workspace(w, "dw", w.shape, w.dtype, w.device).view(w.shape).copy_(grad), None
