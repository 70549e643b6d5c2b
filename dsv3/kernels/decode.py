"""Replaces the eager decoding step of `DeepSeekV3.decode` (`model.static_step` for each block, then the output
head) with the same functions under torch.compile: `compiled_step` and `compiled_head`.

The step's shapes are static (the positions are a tensor, the new latents are written with index_copy_, attention
covers the whole preallocated cache under a mask: `cache.Slots`), so one compiled graph serves every position and
every block (the blocks' weights are inputs of the graph); the MTP modules' draft step is the same function on an
MTPLayer. Under compile the routed experts of a few rows are read by index (`experts.gathered`): no sort, no host
sync, no data-dependent shape. tests/test_generate.py and tests/test_mtp.py check it against the eager step.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from .linear import for_few_rows


def _options(device_type: str) -> dict:
    """Inductor options. On CPU: the graph's launcher is C++ (cpp_wrapper), less overhead per small kernel; and
    every buffer read more than once is computed once into memory (realize_reads_threshold=1), so that a
    multiply-reduce over a weight (`linear.rows_inner`) reads its input rows, not a recomputation of the norm
    before it per weight row. Elsewhere: the defaults."""
    return {"cpp_wrapper": True, "realize_reads_threshold": 1} if device_type == "cpu" else {}


GRAPHS = 64  # compiled graphs allowed per function: one per model shape, batch size and thread count met


def graphs_allowed():
    """A context in which each compiled decoding function may hold up to GRAPHS graphs (around a step's calls,
    not each call: entering it costs). A session (a notebook,
    the playground, the tests) meets several model shapes and thread counts, and dynamo's default limit of 8
    graphs per function is a hard error under fullgraph."""
    import torch._dynamo

    if torch._dynamo.config.recompile_limit >= GRAPHS:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(recompile_limit=GRAPHS)


@functools.cache
def compiled_step(step, device_type: str):
    """`step` (`model.static_step`, passed in: kernels/ imports no reference file) under torch.compile: one graph
    per module class (Block, MTPLayer) and shape."""
    return torch.compile(step, fullgraph=True, options=_options(device_type))


def head(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h W^T, the logits (B, T, rows of weight): on CPU for a few positions in all, the product that reads the
    (vocab, dim) weight once for all of them (`linear.for_few_rows`, as the blocks' projections)."""
    return (for_few_rows(h, weight) or F.linear)(h, weight)


@functools.cache
def compiled_head(device_type: str):
    """`head` under torch.compile."""
    return torch.compile(head, fullgraph=True, options=_options(device_type))
