"""One decoding position with static shapes, eager or torch.compile'd: `decode_step` behind
`DeepSeekV3.decode_step`, the fast path of `model(tokens, cache=cache)` for one new token against an absorbed
MLA cache (`generate(..., compile=True)` uses it).

Static shapes: the position is a 0-d tensor, the new latent is written with index_copy_, and attention covers
the whole preallocated cache under a mask, so one compiled graph serves every position, and every block (the
blocks' weights are inputs of the graph). The routed experts are read by index (`experts.gathered`): no sort,
no host sync, no data-dependent shape. tests/test_generate.py checks it against the cached forward.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from .experts import gathered


def block_decode(block, x, cos, sin, c_kv, k_pe, pos, mask):
    """Block.forward for one new position per row (or T of them: pos (T,), mask (B|1, 1, T, S)) against this
    block's slice of an absorbed MLA cache (c_kv (B, S, r), k_pe (B, S, rope)); `mask` (B|1, 1, 1, S) is True for
    the slots the query may see."""
    attn = block.attn
    q, c, kpe = attn.project(block.attn_norm(x), cos, sin)
    c_kv.index_copy_(1, pos.view(-1), c.to(c_kv.dtype))  # pos: one position, or (T,) for T new tokens per row
    k_pe.index_copy_(1, pos.view(-1), kpe.to(k_pe.dtype))
    x = x + attn.wo(attn.absorbed(q, c_kv.to(x.dtype), k_pe.to(x.dtype), cos, sin, mask))
    h = block.ffn_norm(x)
    if not hasattr(block.ffn, "gate"):  # a dense layer (kernels/ imports no reference file: by attribute)
        return x + block.ffn(h)
    moe, flat = block.ffn, h.reshape(-1, h.shape[-1])
    gates, indices, _, _ = moe.gate(flat)
    y = gathered(moe.experts, flat, indices, gates)
    if moe.shared_experts is not None:
        y = y + moe.shared_experts(flat)
    moe.record(indices)
    return x + y.view(h.shape)


def _options(device_type: str) -> dict:
    """Inductor options. On CPU the graph's launcher is C++ (cpp_wrapper), less overhead per small kernel, and
    decompose_mm_pass turns each (1 x k) @ (k x n) product of a batch-1 step into a multiply-reduce loop fused
    with its neighbours, which streams the weight once (`python benchmarks/gemv.py`). Elsewhere: the defaults."""
    if device_type != "cpu":
        return {}
    return {"cpp_wrapper": True, "post_grad_fusion_options": {"decompose_mm_pass": {}}}


GRAPHS = 64  # compiled graphs allowed per function: one per model shape, batch size and thread count met


def graphs_allowed():
    """A context in which each compiled decoding function may hold up to GRAPHS graphs. A session (a notebook,
    the playground, the tests) meets several model shapes and thread counts, and dynamo's default limit of 8
    graphs per function is a hard error under fullgraph."""
    import torch._dynamo

    if torch._dynamo.config.recompile_limit >= GRAPHS:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(recompile_limit=GRAPHS)


@functools.cache
def compiled_block_decode(device_type: str):
    """`block_decode` under torch.compile: one graph for every block of every model of the same shapes."""
    return torch.compile(block_decode, fullgraph=True, options=_options(device_type))


def head_decode(norm: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The last position's logits, head(norm(x))[:, -1]. On CPU, for up to 4 rows, as a multiply-reduce that
    inductor fuses into one pass over the (vocab, dim) weight."""
    h = norm(x)[:, -1]
    if weight.device.type == "cpu" and h.shape[0] <= 4:
        return (h[:, None, :] * weight).sum(-1)
    return F.linear(h, weight)


@functools.cache
def compiled_head_decode(device_type: str):
    return torch.compile(head_decode, fullgraph=True, options=_options(device_type))


@torch.no_grad()
def decode_step(model, tokens: torch.Tensor, cache, compiled: bool = False) -> torch.Tensor:
    """Logits (B, vocab) of one new position per row, tokens (B, 1); the cache advances by one."""
    dev = model.rope_cos.device
    pos = torch.tensor(cache.pos, device=dev)
    cos, sin = model.rope_cos.index_select(0, pos.view(1)), model.rope_sin.index_select(0, pos.view(1))
    mask = cache.mask(1, whole_cache=True)  # the slots written so far, minus padding
    x = model.embed(tokens)
    step = compiled_block_decode(dev.type) if compiled else block_decode
    with graphs_allowed() if compiled else contextlib.nullcontext():
        for block in model.layers:
            x = step(block, x, cos, sin, cache.c_kv[block.layer_id], cache.k_pe[block.layer_id], pos, mask)
        cache.pos += 1
        if compiled:
            return compiled_head_decode(dev.type)(model.norm, model.head.weight, x)
    return model.head(model.norm(x))[:, -1]
