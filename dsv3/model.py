"""The DeepSeek-V3 language model: `Block`, `DeepSeekV3`, `ModelOutput`, `count_params`.

A pre-norm decoder: x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x)), where Attn is MLA (or GQA for the
dense baseline) and FFN is DeepSeekMoE (or a dense SwiGLU for the first n_dense_layers / the
baseline). `forward(tokens, targets)` returns logits and, with targets, the losses
loss = ce + aux_loss_coef * balance + z_loss_coef * z (router losses averaged over MoE layers)
+ mtp_loss_weight / D * sum_k CE_k with D multi-token prediction modules (`mtp.MTPLayer`, DeepSeek-V3 §2.2).
Targets are the next tokens, already shifted by the data pipeline; the model never shifts again.
Incremental decoding goes through `new_cache()`; the model advances the cache's position.
`decode_step(tokens, cache, compiled=...)` is one decoding position with static shapes, eager or with every
block through one torch.compile'd graph (`generate(..., compile=True)` uses it).
Training's `forward(tokens, targets, return_logits=False)` takes the fused chunked head + cross-entropy
(`linear_cross_entropy`), with the tied embedding lookup (`TiedEmbedding`) adding its gradient into the head's.
Nothing here knows about optimizers, data files or tokenizers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import Expert, RMSNorm, onednn_mm, rope_cache, use_onednn, workspace
from .mla import GQA, MLA, KVCache
from .moe import MoE
from .mtp import MTPLayer


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, vocab_size); None when called with return_logits=False
    loss: torch.Tensor | None = None  # ce_loss + aux_loss + z_loss
    ce_loss: torch.Tensor | None = None  # next-token cross-entropy (nats per token)
    aux_loss: torch.Tensor | None = None  # aux_loss_coef * mean balance loss over MoE layers
    z_loss: torch.Tensor | None = None  # z_loss_coef * mean router z-loss over MoE layers
    mtp_loss: torch.Tensor | None = None  # mtp_loss_weight / D * sum of the MTP depths' CE (0 without MTP)
    hidden: torch.Tensor | None = None  # (B, T, dim) the last hidden state after the final norm (depth 1's input)


CE_CHUNK = 256  # rows per chunk of the fused head + cross-entropy on the CPU, at least (x 50,257 fp32 = 51 MB, reused)
CE_CHUNK_ELEMS = 65536  # ... and at least this many h elements (rows x dim) per chunk: 512 rows at dim 128 (`tiny`)
INPLACE_CE_DEVICES = ("cpu",)  # device types whose chunk log-softmax runs in place in reused buffers
CE_CHUNK_ACCEL = 4096  # rows per chunk elsewhere (GPUs): fewer, larger matmuls and fewer bf16 dW partials to sum
CE_LOGITS_BLOCK = 2048  # CPU fp32: the chunk's logits by oneDNN in blocks of this many classes (see _chunk_logits)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """out (rows, V) = h @ w^T, into a view of a kept buffer. CPU fp32: oneDNN, CE_LOGITS_BLOCK classes at a
    time (its result is a fresh tensor: 2-4 MB blocks come back from glibc's heap, a 51-103 MB one would be
    faulted in anew), each copied in while still in cache. On a 2-core AMD EPYC (Zen 4) this took the logits
    GEMM of a 256-row 174m chunk from 113 to 89 ms and of a 512-row tiny chunk from 57 to 51 ms (a throwaway
    interleaved timing); MKL itself, blocked the same way, gained about half as much."""
    if not use_onednn(h, w):
        torch.mm(h, w.t(), out=out)
        return
    for j in range(0, w.shape[0], CE_LOGITS_BLOCK):
        out[:, j:j + CE_LOGITS_BLOCK].copy_(onednn_mm(h, w[j:j + CE_LOGITS_BLOCK]))


class LinearCrossEntropy(torch.autograd.Function):
    """mean CE(h @ W^T, targets) without ever holding the (tokens, vocab) logits: row chunks (CE_CHUNK rows and
    CE_CHUNK_ELEMS elements of h at least, on the CPU), and each chunk's gradient (softmax - onehot) is used at
    once for dh and dW, so backward only rescales them.
    Same matmuls as the plain head + F.cross_entropy (no recompute). Targets == -100 are ignored. Under autocast
    the matmuls run in the autocast dtype and the (log-)softmax in fp32, as autocast does for the plain path.
    Speed (benchmarks/profile_step.py): the chunk's buffers are allocated once and every op after the matmul
    works in place; a fresh 50-200 MB tensor per op costs a page fault per 4 KB, which made this head 1.7x
    slower in fp32 (1.8x in bf16) on the 2-core CPU. On the CPU the chunk buffers and the fp32 dW are also kept
    from step to step (`layers.workspace`): glibc hands freed blocks this large back to the kernel, and faulting in
    their ~41k pages again every step cost the 174m step ~10% on one 2-core VM and ~3% on another."""

    @staticmethod
    def forward(ctx, h, weight, targets, tied=None):
        dt = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        inplace = h.device.type in INPLACE_CE_DEVICES
        n_rows = h.shape[0]
        # CPU: narrow h gets more rows per chunk; in interleaved A/Bs of training steps on a 2-core CPU, 512 rows
        # beat 256 by ~6% on the tiny step (dim 128), while 256 beat 512 on 174m's (dim 576)
        rows = max(CE_CHUNK, CE_CHUNK_ELEMS // h.shape[1]) if inplace else CE_CHUNK_ACCEL
        chunk = max(1, min(rows, n_rows))
        V = weight.shape[0]
        # The chunk buffers' rows are padded to Vp, a multiple of 64, whose padding logits are -inf (probability 0,
        # gradient 0). Accelerators pad W too, with zero rows: with the odd 50,257, cuBLAS on an H200 ran the head's
        # three GEMMs at 92-123 TFLOP/s, padded to 50,304 at 667-756 (`python benchmarks/head_gemm.py` there). The
        # CPU keeps W as is, and its GEMMs read the (rows, V) view: MKL wrote the logits 1.1-1.4x faster into the
        # 64-byte-aligned rows on a 2-core AMD EPYC (`python benchmarks/head_gemm.py --device cpu`).
        Vp = -(-V // 64) * 64
        buf = functools.partial(workspace, weight) if inplace else \
            (lambda name, shape, dtype: torch.empty(shape, dtype=dtype, device=h.device))
        with torch.autocast(h.device.type, enabled=False):
            # the CPU casts W into a kept buffer: a fresh 58 MB bf16 copy of the 174m's head took ~100 ms to fault in
            hc = h.to(dt)
            wc = buf("w_cast", weight.shape, dt).copy_(weight) if inplace and dt != weight.dtype else weight.to(dt)
            if not inplace and Vp != V:
                wc = F.pad(wc, (0, 0, 0, Vp - V))
            Vw = wc.shape[0]  # the classes the GEMMs see: Vp on accelerators, V on the CPU
            valid = targets != -100
            n = valid.sum()
            row_w = valid / n  # d(mean CE)/d(row's CE): 1/n, 0 for ignored rows (folded into dh and dW here)
            total = h.new_zeros((), dtype=torch.float32)
            dh = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_grad else None
            z = buf("z", (chunk, Vp), dt)  # logits, then the gradient in dt
            # the in-place path's fp32 probabilities overwrite the logits; bf16 logits: an fp32 buffer of their own
            probs = buf("probs", z.shape, torch.float32) if inplace and dt != torch.float32 else z
            # accelerators: a chunk's dW in dt, summed in fp32; the in-place path sums fp32 products instead
            dw_c = torch.empty(wc.shape, dtype=dt, device=h.device) \
                if need_grad and dt != torch.float32 and not inplace else None
            # fp32 products write dW with the first chunk's (no pass to zero 4 x vocab x dim bytes); dt partials add.
            # A fresh view of the kept buffer: autograd then takes it as the weight's .grad without a copy
            dw = (buf("dw", wc.shape, torch.float32).view(wc.shape) if dw_c is None else
                  torch.zeros(wc.shape, dtype=torch.float32, device=h.device)) if need_grad else None
            for i in range(0, n_rows, chunk):
                rows = slice(i, i + chunk)
                c = hc[rows].shape[0]
                zc, pc = z[:c], probs[:c]
                _chunk_logits(hc[rows], wc, zc[:, :Vw])
                zc[:, V:] = float("-inf")  # the padding classes
                tgt, ok, rw = targets[rows].clamp(min=0), valid[rows], row_w[rows, None]
                if inplace:  # in place into the reused fp32 buffer (tested here; CPU has no bf16 -> fp32 variant): the
                    # softmax, so the gradient needs no exp pass over the chunk after a log-softmax; CE = -log p_target
                    pc = torch.ops.aten._softmax.out(zc if pc is zc else pc.copy_(zc), 1, False, out=pc)
                    ce = _ce_from_probs(pc, tgt, hc[rows], wc)
                else:  # accelerators: a fresh tensor from the caching allocator costs nothing; no aliasing or host sync
                    lp = zc.float().log_softmax(dim=1)
                    ce = -lp.gather(1, tgt[:, None]).squeeze(1)
                    pc = lp.exp_() if need_grad else None
                total += (ce * ok).sum()
                if need_grad:  # d(mean CE)/d logits = (softmax - onehot) / n; ignored rows are zeroed by rw
                    g32 = pc[:, :Vw]
                    g32[torch.arange(c, device=pc.device), tgt] -= 1
                    g = g32 if dt == torch.float32 else zc[:, :Vw].copy_(g32)
                    dh[rows] = (g @ wc).float() * rw
                    if dw_c is None:  # fp32 products: bf16-rounded chunk partials made bf16 training spike on CPU
                        if i == 0:
                            torch.mm(g32.t(), h[rows].float() * rw, out=dw)
                        else:
                            dw.addmm_(g32.t(), h[rows].float() * rw)
                    else:  # the 0/1 row mask in dt (exact); 1/n once in fp32 below, not rounded to dt
                        dw.add_(torch.mm(g.t(), hc[rows] * ok[:, None].to(dt), out=dw_c))
            if dw_c is not None:
                dw.div_(n)
        ctx.save_for_backward(dh, dw)
        ctx.vocab, ctx.tied = V, tied
        return total / n

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        if dw is not None:
            # scaled in place: dW is as large as the embedding. The CPU skips that pass over it when the loss's
            # gradient is 1 (the usual case: the trainer's loss is a sum that includes this mean); the version
            # bump still makes a second backward fail the saved-tensor check instead of returning stale grads.
            if dw.device.type == "cpu" and grad.item() == 1.0:
                torch.autograd.graph.increment_version(dw)
            else:
                dw.mul_(grad)
            dw = dw[:ctx.vocab].to(ctx.w_dtype)
            if ctx.tied is not None:  # the tied embedding's backward adds its rows into this same tensor
                ctx.tied.dw = dw
        return dh.mul_(grad).to(ctx.h_dtype) if dh is not None else None, dw, None, None


def _ce_from_probs(p: torch.Tensor, tgt: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Each row's cross-entropy -log p[target] from its fp32 softmax p. Where p[target] is below 1e-30 (a CE
    above 69 nats, near fp32's underflow) the row's logits h @ w^T are recomputed and its CE is logsumexp - logit."""
    pt = p.gather(1, tgt[:, None]).squeeze(1)
    ce = -pt.log()
    low = pt < 1e-30
    if low.any():
        z = (h[low] @ w.t()).float()
        ce[low] = torch.logsumexp(z, dim=1) - z.gather(1, tgt[low, None]).squeeze(1)
    return ce


class _TiedGrad:
    """Hands the head's dW (from LinearCrossEntropy.backward) to the backward of the tied embedding lookup."""

    dw: torch.Tensor | None = None


class TiedEmbedding(torch.autograd.Function):
    """F.embedding(tokens, weight) for a weight tied to the fused head (LinearCrossEntropy with the same `tied`).
    Its backward adds the looked-up rows' gradients in place into the head's dW, which autograd then accumulates as
    the weight's gradient, where nn.Embedding would build a dense (vocab, dim) zero gradient and autograd would add
    it to the head's in a third (vocab, dim) tensor: two passes over and two new allocations of 4 x vocab x dim
    bytes (116 MB at 174m) per step. The head's backward always runs first (the embedding is the graph's input end);
    if it did not give a dW (a loss without the head), the gradient is the dense one."""

    @staticmethod
    def forward(ctx, weight, tokens, tied):
        ctx.save_for_backward(tokens)
        ctx.tied, ctx.shape = tied, weight.shape
        return F.embedding(tokens, weight)

    @staticmethod
    def backward(ctx, grad):
        (tokens,) = ctx.saved_tensors
        dw, ctx.tied.dw = ctx.tied.dw, None
        rows = grad.reshape(-1, grad.shape[-1])
        if dw is None:
            return grad.new_zeros(ctx.shape).index_add_(0, tokens.reshape(-1), rows), None, None
        dw.index_add_(0, tokens.reshape(-1), rows.to(dw.dtype))
        return None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         tied: _TiedGrad | None = None) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, targets, ignore_index=-100) with no full logits tensor (see LinearCrossEntropy).
    tied: shared with a TiedEmbedding of the same weight, whose backward then adds into this head's dW."""
    return LinearCrossEntropy.apply(h, weight, targets, tied)


class Block(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg) if cfg.attn == "mla" else GQA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer_id) else Expert(cfg.dim, cfg.dense_inter_dim)

    def forward(self, x, cos, sin, cache=None, mask=None, losses=True):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, self.layer_id, mask)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            y, balance, z = self.ffn(h, losses)
            return x + y, balance, z
        return x + self.ffn(h), None, None

    def decode(self, x, cos, sin, c_kv, k_pe, pos, mask):
        """forward() for one new position per row against this block's slice of an absorbed MLA cache, with static
        shapes (see MLA.decode); returns x only. What DeepSeekV3.decode_step runs, eagerly or compiled."""
        x = x + self.attn.decode(self.attn_norm(x), cos, sin, c_kv, k_pe, pos, mask)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            return x + self.ffn(h, losses=False, gathered=True)[0]
        return x + self.ffn(h)


def _decode_options(device_type: str) -> dict:
    """Inductor options of the compiled one-token step. On CPU the graph's launcher is C++ (cpp_wrapper) instead
    of Python: less overhead for each of the many small kernels. And inductor's decompose_mm_pass turns each
    (1 x k) @ (k x n) matmul of a batch-1 step (n, k <= 2048) into a multiply-reduce loop fused with its
    neighbours, which streams the weight once: on a 2-core AMD EPYC, MKL's matrix-vector products read the 174m
    blocks' weights at ~8 GB/s, a quarter of its copy bandwidth (`python benchmarks/gemv.py`). Other devices:
    inductor's defaults."""
    if device_type != "cpu":
        return {}
    return {"cpp_wrapper": True, "post_grad_fusion_options": {"decompose_mm_pass": {}}}


@functools.cache
def _compiled_block_decode(device_type: str):
    """Block.decode under torch.compile: one graph for every block of every model of the same shapes (the blocks'
    weights are inputs of the graph)."""
    return torch.compile(Block.decode, fullgraph=True, options=_decode_options(device_type))


def _head_decode(norm: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The last position's logits, head(norm(x))[:, -1], for the compiled one-token step. On CPU, for up to 4
    rows, as a multiply-reduce that inductor fuses into one pass over the (vocab, dim) weight, ~3x faster than
    MKL's matrix-vector product there (`python benchmarks/gemv.py`)."""
    h = norm(x)[:, -1]
    if weight.device.type == "cpu" and h.shape[0] <= 4:
        return (h[:, None, :] * weight).sum(-1)
    return F.linear(h, weight)


@functools.cache
def _compiled_head_decode(device_type: str):
    return torch.compile(_head_decode, fullgraph=True, options=_decode_options(device_type))


class DeepSeekV3(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(i, cfg) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        # multi-token prediction (DeepSeek-V3 §2.2): depth k's block is layer k - 1 of its own cache, and MoE even
        # where the trunk's first layers are dense (as in DeepSeek-V3, whose MTP layer is an MoE layer)
        self.mtp = nn.ModuleList(MTPLayer(cfg, Block(k, cfg.replace(n_dense_layers=0)))
                                 for k in range(cfg.n_mtp_layers)) if cfg.n_mtp_layers else None
        rope_dim = cfg.qk_rope_head_dim if cfg.attn == "mla" else cfg.head_dim
        cos, sin = rope_cache(rope_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual outputs (wo, w2) scaled by 1/sqrt(2 n_layers) as in GPT-2."""
        std = self.cfg.init_std
        resid_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.fill_(1.0)
            else:
                residual = name.endswith(("wo.weight", "w2.weight", ".w2"))
                nn.init.normal_(p, mean=0.0, std=resid_std if residual else std)
        for m in self.moe_layers(mtp=True):
            m.gate.bias.zero_()

    # --- helpers the trainer, generator and plots use ---
    def moe_layers(self, mtp: bool = False) -> list[MoE]:
        """The trunk's MoE layers; mtp=True: then the MTP blocks' too."""
        blocks = list(self.layers) + ([m.block for m in self.mtp] if mtp and self.mtp is not None else [])
        return [b.ffn for b in blocks if isinstance(b.ffn, MoE)]

    def expert_loads(self) -> torch.Tensor:
        """(n_moe_layers, n_routed_experts) routed-slot counts of the last forward."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, 0)
        return torch.stack([m.last_load for m in layers]).cpu()

    def compile_blocks(self) -> None:
        """torch.compile each Block in place (regional compilation). The blocks run the same code, so they share
        one compiled graph (tests/test_perf.py) where a whole-model compile traces every layer. Parameter names
        are unchanged, so checkpoints do not notice. The embedding and the fused head + cross-entropy stay eager."""
        for block in [*self.layers, *(m.block for m in self.mtp or [])]:  # MTP blocks: T - k positions
            block.compile()

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, cache: KVCache, *, compiled: bool = False) -> torch.Tensor:
        """Logits (B, vocab) of one new position per row, tokens (B, 1), against an absorbed MLA cache, which
        advances by one: forward(tokens, cache=cache) with static shapes. The position is a tensor and attention
        covers the whole preallocated cache under a mask, so with compiled=True every block runs one
        torch.compile'd graph, shared by all blocks and all positions (compiled on the first call; the blocks'
        many small ops become a few fused kernels). For decoding: no gradients, no router losses."""
        if self.cfg.attn != "mla" or not cache.absorb:
            raise ValueError("decode_step needs an MLA model and an absorbed cache (new_cache(..., absorb=True))")
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] != 1:
            raise ValueError(f"decode_step takes tokens of shape (batch, 1), got {getattr(tokens, 'shape', tokens)}")
        self._check(tokens, None, cache)
        dev = self.rope_cos.device
        pos = torch.tensor(cache.pos, device=dev)
        cos, sin = self.rope_cos.index_select(0, pos.view(1)), self.rope_sin.index_select(0, pos.view(1))
        mask = self._mask(cache, 1, whole_cache=True)  # the slots written so far, minus padding
        x = self.embed(tokens)
        block_decode = _compiled_block_decode(dev.type) if compiled else Block.decode
        for block in self.layers:
            i = block.layer_id
            x = block_decode(block, x, cos, sin, cache.c_kv[i], cache.k_pe[i], pos, mask)
        cache.pos += 1
        if compiled:
            return _compiled_head_decode(dev.type)(self.norm, self.head.weight, x)
        return self.head(self.norm(x))[:, -1]

    def update_router_bias(self) -> None:
        """Aux-loss-free balancing: apply each gate's bias update (call once per optimizer step)."""
        for m in self.moe_layers(mtp=True):
            m.gate.update_bias()

    def new_cache(self, batch: int, max_len: int | None = None, *, absorb: bool = True,
                  dtype: torch.dtype | None = None) -> KVCache:
        p = self.embed.weight
        return KVCache(self.cfg, batch, max_len or self.cfg.max_seq_len, absorb=absorb,
                       device=p.device, dtype=dtype or p.dtype)

    # --- forward ---
    def _check(self, tokens, targets, cache) -> None:
        cfg = self.cfg
        if not isinstance(tokens, torch.Tensor):
            raise ValueError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must have dtype torch.long (or int32), got {tokens.dtype}")
        if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
            raise ValueError(f"tokens must have shape (batch, seq_len) with both >= 1, got {tuple(tokens.shape)}")
        T = tokens.shape[1]
        limit = cfg.max_seq_len if cache is None else cache.max_len - cache.pos
        if T > limit:
            where = f"max_seq_len={cfg.max_seq_len}" if cache is None else \
                f"the cache's free space ({cache.max_len} - {cache.pos} = {limit})"
            raise ValueError(f"sequence length {T} exceeds {where}")
        if cache is not None and tokens.shape[0] != cache.batch:
            raise ValueError(f"tokens batch {tokens.shape[0]} does not match the cache batch {cache.batch}")
        if tokens.device.type != "cpu":  # an accelerator: check on the device, no host sync per step
            torch._assert_async(((tokens >= 0) & (tokens < cfg.vocab_size)).all(),
                                f"token ids must be in [0, vocab_size={cfg.vocab_size})")
        elif not torch.compiler.is_compiling():
            lo, hi = tokens.min().item(), tokens.max().item()
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"token ids must be in [0, vocab_size={cfg.vocab_size}), got min {lo}, max {hi}")
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.shape != tokens.shape:
                got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
                raise ValueError(f"targets must be a tensor shaped like tokens {tuple(tokens.shape)}, got {got}")
            if targets.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"targets must have dtype torch.long, got {targets.dtype}")

    def _mask(self, cache: KVCache, T: int, whole_cache: bool = False) -> torch.Tensor | None:
        """Boolean (B|1, 1, T, S) attention mask for a cached forward over S = pos+T keys; None = plain causal
        prefill. whole_cache=True: over all S = max_len slots of the cache (decode_step's static shapes)."""
        start = cache.pos
        if start == 0 and cache.key_mask is None and not whole_cache:
            return None
        dev = self.rope_cos.device
        S = cache.max_len if whole_cache else start + T
        q_pos = torch.arange(start, start + T, device=dev)
        k_pos = torch.arange(S, device=dev)
        mask = k_pos[None, :] <= q_pos[:, None]  # (T, S) causal
        if cache.key_mask is not None:  # never attend to padding, but let every query see itself
            mask = (mask & cache.key_mask[:, None, :S]) | (k_pos[None, :] == q_pos[:, None])
            return mask[:, None]
        return mask[None, None]

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, *, return_logits: bool = True, last_logits: bool = False) -> ModelOutput:
        """return_logits=False (with targets): the loss comes from the fused chunked head + cross-entropy
        (`linear_cross_entropy`), the (B, T, vocab) logits are never built and `logits` is None; for training.
        last_logits=True (without targets): only the last position's logits, (B, 1, vocab), which is all that
        decoding needs; the head skips the prompt's other positions."""
        self._check(tokens, targets, cache)
        T = tokens.shape[1]
        start = cache.pos if cache is not None else 0
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        mask = self._mask(cache, T) if cache is not None else None
        fused = targets is not None and not return_logits
        w = self.embed.weight
        tied = _TiedGrad() if fused and self.head.weight is w and w.requires_grad and torch.is_grad_enabled() \
            and self.mtp is None else None  # (with MTP the head runs 1 + D times: autograd sums the dense grads)
        x = emb = TiedEmbedding.apply(w, tokens, tied) if tied is not None else self.embed(tokens)
        balances, zs = [], []
        for block in self.layers:
            x, balance, z = block(x, cos, sin, cache, mask, losses=targets is not None)
            if balance is not None:
                balances.append(balance)
                zs.append(z)
        if cache is not None:
            cache.pos += T
        hidden = h = self.norm(x)
        if fused:
            logits = None
            ce = linear_cross_entropy(h.flatten(0, 1), self.head.weight, targets.reshape(-1).long(), tied)
        else:
            if last_logits:
                if targets is not None:
                    raise ValueError("last_logits=True is for decoding; it cannot be combined with targets")
                h = h[:, -1:]
            logits = self.head(h)
            if targets is None:
                return ModelOutput(logits=logits, hidden=hidden)
            ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1).long(),
                                 ignore_index=-100)
        zero = ce.new_zeros(())
        mtp = self._mtp_loss(hidden, emb, targets, cos, sin, fused, balances, zs) if self.mtp is not None else zero
        aux = self.cfg.aux_loss_coef * torch.stack(balances).mean() if balances else zero
        z = self.cfg.z_loss_coef * torch.stack(zs).mean() if zs else zero
        return ModelOutput(logits=logits, loss=ce + aux + z + mtp, ce_loss=ce, aux_loss=aux, z_loss=z, mtp_loss=mtp,
                           hidden=hidden)

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor, fused: bool) -> torch.Tensor:
        """Mean CE of head(h) (B, T, dim) against targets (B, T) (-100 = ignored): the fused chunked head +
        cross-entropy when fused, else full logits and F.cross_entropy. The MTP depths' loss path."""
        if fused:
            return linear_cross_entropy(h.flatten(0, 1), self.head.weight, targets.reshape(-1).long())
        logits = self.head(h)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1).long(), ignore_index=-100)

    def _mtp_loss(self, h, emb, targets, cos, sin, fused, balances, zs) -> torch.Tensor:
        """lambda / D * sum_k L_MTP^k (DeepSeek-V3 eq. 24-25). Depth k at position i reads h_i^{k-1} and Emb(t_{i+k})
        and is scored on t_{i+k+1} = targets[i + k], for i = 0 .. T-k-1: nothing past the sequence's end. L^k is
        the mean over those positions (the paper divides by T). The MTP blocks' router losses join `balances`."""
        T, losses = targets.shape[1], []
        for k, layer in enumerate(self.mtp, start=1):
            if T - k < 1:
                break
            h, balance, z = layer(h[:, :T - k], emb[:, k:], cos[:T - k], sin[:T - k])
            losses.append(self.head_loss(h, targets[:, k:], fused))
            if balance is not None:
                balances.append(balance)
                zs.append(z)
        total = torch.stack(losses).sum() if losses else h.new_zeros((), dtype=torch.float32)
        return self.cfg.mtp_loss_weight / len(self.mtp) * total


def count_params(model: DeepSeekV3) -> dict[str, int]:
    """Parameter counts: total (tied weights once) and active per token, with a breakdown.

    Active = total minus the routed experts a token does not use ((N_r - K_r) per MoE layer).
    The embedding counts once: with tied weights it is the output head every token runs.
    With MTP modules (their embedding and head are the main model's): "mtp" and "mtp_active" count their own
    parameters, part of total and active (training runs them), and "inference_total" / "inference_active" count
    what decoding without speculation uses (total and active minus the MTP modules').
    """
    cfg = model.cfg
    seen: set[int] = set()
    mtp = 0
    parts = {"embedding": 0, "attention": 0, "routed_experts": 0, "shared_experts": 0, "dense_mlp": 0,
             "router": 0, "norms": 0, "head": 0}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.startswith("mtp."):
            mtp += p.numel()
            continue
        if name.startswith("embed"):
            key = "embedding"
        elif name.startswith("head"):
            key = "head"
        elif ".attn." in name:
            key = "attention"
        elif ".experts." in name:
            key = "routed_experts"
        elif ".shared_experts." in name:
            key = "shared_experts"
        elif ".gate." in name:
            key = "router"
        elif ".ffn." in name:
            key = "dense_mlp"
        else:
            key = "norms"
        parts[key] += p.numel()
    total = sum(parts.values()) + mtp
    per_expert = 3 * cfg.dim * cfg.moe_inter_dim
    unused = (cfg.n_routed_experts - cfg.n_activated_experts) * per_expert  # per MoE layer
    inactive = len(model.moe_layers()) * unused
    counts = {"total": total, "active": total - inactive, **parts}
    if model.mtp is not None:
        mtp_active = mtp - (len(model.moe_layers(mtp=True)) - len(model.moe_layers())) * unused
        counts["active"] -= mtp - mtp_active
        counts.update(mtp=mtp, mtp_active=mtp_active, inference_total=total - mtp,
                      inference_active=counts["active"] - mtp_active)
    return counts
