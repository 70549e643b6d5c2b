"""Fast paths beside the reference model, the one switch that turns them all off, and the one table that says
which implementation each call takes and why.

The reference files (layers.py, mla.py, moe.py, model.py) are plain PyTorch. Five of their functions are marked
`@kernels.fast_path(kernels.<file>_<function>)`, naming its entry in the table below. While the kernels are on,
that entry runs first with the reference function and its arguments, and either returns the result of a kernel,
or None where no kernel applies (another device, dtype or shape): the reference runs then.

  kernels.enabled()          True unless DSV3_KERNELS=0 is set or a `disabled()` block is active
  with kernels.disabled():   the reference alone: no custom autograd Function, no kept buffer
  --no-kernels               the same switch on `python -m dsv3 train | generate | bench`

Imports run one way: the reference files import this package; nothing under kernels/ imports a reference file
(decode.py reads the model's modules by attribute). Each kernel file names the reference it replaces and is tested
equal to it (values and gradients) under tests/kernels/; buffers.py holds the buffers they keep from step to step.
`DeepSeekV3.decode`'s static step (T new positions per row, torch.compile'd in kernels/decode.py) is its own
entry point.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from . import attention as _attention
from . import experts as _experts
from . import head as _head
from . import linear as _linear

_enabled = os.environ.get("DSV3_KERNELS", "1").strip().lower() not in ("0", "false", "off", "no")


def enabled() -> bool:
    """Whether the reference functions may take their kernels (default True; DSV3_KERNELS=0 starts with False)."""
    return _enabled


def set_enabled(on: bool) -> None:
    """Switch the kernels on or off for the whole process (the CLI's --no-kernels)."""
    global _enabled
    _enabled = bool(on)


@contextlib.contextmanager
def disabled():
    """Run the reference model inside this block: every reference function takes its plain PyTorch path."""
    global _enabled
    prev, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = prev


def fast_path(choose):
    """Decorate a reference function with its entry `choose` of the table below: while the kernels are on,
    choose(reference, *args) runs first, and the reference runs when it returns None. `.reference` is the plain
    function (an entry may also run it on other inputs, as the flash attention path does)."""

    def wrap(reference):
        @functools.wraps(reference)
        def call(*args, **kwargs):
            if _enabled and (out := choose(reference, *args, **kwargs)) is not None:
                return out
            return reference(*args, **kwargs)

        call.reference, call.kernel = reference, choose
        return call

    return wrap


# --- the table: one entry per reference function; each says which kernel runs, and when ---

def layers_linear(reference, x, weight, bias=None):
    """`layers.linear`, x W^T: oneDNN's GEMM (linear.py) for fp32 CPU tensors without bias, outside autocast and
    torch.compile, with at least linear.MIN_ROWS rows (one-token decoding keeps torch's matrix-vector product);
    CPU inference on a few rows (a decoding step of 1 to linear.FEW_ROWS positions), where the product must read
    the weight once for all rows: under torch.compile `linear.rows_inner`, one multiply-reduce per row that
    inductor fuses into one pass over W; eagerly, from 2 rows, W x^T (`linear.few_rows`: the BLAS call streams
    the weight)."""
    if bias is None and _linear.use_onednn(x, weight):
        return _linear.OneDNNLinear.apply(x, weight)
    if bias is None and (product := _linear.for_few_rows(x, weight)) is not None:
        return product(x, weight)
    return None


def mla_attention(reference, q, kv, k_pe, cos, sin, scale, nope, mask=None):
    """`mla.attention`. With a mask (decoding against a cache): the reference. Without (training, prefill):
    on the CPU, eager, one row of positions per batch row (no per-row cos/sin), while the fp32 scores
    B x H x T^2 fit in attention.CPU_MAX_SCORE_BYTES: `CausalAttention`, written out with its own backward;
    elsewhere (GPUs, long CPU sequences, torch.compile), when V is narrower than Q/K: SDPA's flash kernel with V
    zero-padded (`flash_attention`: the reference on padded inputs); otherwise the reference."""
    if mask is not None:
        return None
    B, T, H, d = q.shape
    if (q.device.type == "cpu" and not torch.compiler.is_compiling() and cos.dim() == 2 and kv.shape[1] == T
            and B * H * T * T * 4 <= _attention.CPU_MAX_SCORE_BYTES):
        return _attention.CausalAttention.apply(q, kv, k_pe, cos, sin, scale, nope).view(B, T, -1)
    if kv.shape[-1] - nope < d:
        return _attention.flash_attention(reference, q, kv, k_pe, cos, sin, scale, nope)
    return None


def moe_routed_experts(reference, experts, x, indices, gates):
    """`moe.routed_experts`: `experts.sorted_dispatch`, the (token, slot) pairs sorted by expert, then every
    expert's SwiGLU at once on its rows, in the autocast dtype (else x's), by the variant that suits:
      CPU bf16, grad on          `_padded_grouped_swiglu`: rows padded per expert, so oneDNN reuses its kernels
      CPU, grad off (inference)  `_looped_swiglu`: one matmul per expert that received rows (grouped_mm would
                                 visit the empty experts too; decoding touches k of N)
      bf16 elsewhere (GPUs)      `_grouped_swiglu`: one grouped_mm per weight, one graph under torch.compile
      CPU fp32, grad on          `_kept_grad_swiglu`: grouped_mm with the weight gradients in kept buffers
      otherwise                  `_looped_swiglu` (fp32 on GPUs; MPS and torch builds without grouped_mm)
    except in the compiled decoding step (inference under torch.compile, at most experts.GATHER_ROWS rows):
    `experts.gathered`, each row reading its k experts by index (no sort, no data-dependent shape)."""
    if torch.compiler.is_compiling() and not torch.is_grad_enabled() and x.shape[0] <= _experts.GATHER_ROWS:
        return _experts.gathered(experts, x, indices, gates)
    dev = x.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    grouped = _experts._HAS_GROUPED_MM and dev in ("cpu", "cuda")  # torch has grouped_mm kernels there (not MPS)
    cpu, grad, bf16 = dev == "cpu", torch.is_grad_enabled(), dt == torch.bfloat16
    if cpu and grouped and bf16 and grad:
        swiglu = _experts._padded_grouped_swiglu
    elif cpu and not grad:
        swiglu = _experts._looped_swiglu
    elif grouped and bf16:
        swiglu = _experts._grouped_swiglu
    elif grouped and cpu:
        swiglu = _experts._kept_grad_swiglu
    else:
        swiglu = _experts._looped_swiglu
    return _experts.sorted_dispatch(experts, x, indices, gates, dt, swiglu)


def model_embed_tokens(reference, model, tokens):
    """`model.embed_tokens`: while training a head tied to the embedding (without MTP, whose extra heads autograd
    sums), `head.tied_embedding`, whose backward adds into the fused head's weight gradient (head.py); else the
    reference lookup."""
    w = model.embed.weight
    if model.head.weight is w and w.requires_grad and torch.is_grad_enabled() and model.mtp is None:
        return _head.tied_embedding(w, tokens)
    return _head.untied(w)


def model_head_loss(reference, model, h, targets):
    """`model.head_loss`: always `head.linear_cross_entropy`, the head and its cross-entropy fused over row chunks
    (the (tokens, vocab) logits never exist at once)."""
    w = model.head.weight
    return _head.linear_cross_entropy(h.flatten(0, 1), w, targets.reshape(-1).long(), _head.take_tied(w))
