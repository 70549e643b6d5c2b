"""DeepSeekMoE (DeepSeek-V3 §2.1.2): `Gate` (router), `RoutedExperts`, `MoE`, and the router losses.

h'_t = u_t + sum_i FFN^(s)_i(u_t) + sum_i g_i,t FFN^(r)_i(u_t)                       (eq. 12)
s_i,t = Softmax_i(u_t^T e_i) or Sigmoid(u_t^T e_i)                                  (eq. 15, V2 / V3)
Top-k selection uses s_i,t + b_i (b = aux-loss-free bias, selection only, eq. 16); the gates g come
from the unbiased s: renormalised over the top-k for sigmoid (eq. 13), not for softmax (V2), then
times route_scale.
Losses: balance loss alpha * N * sum_i f_i P_i (V2 eq. 23-25) and router z-loss
mean_t logsumexp(logits_t)^2 (ST-MoE, Zoph et al. 2022).
Dispatch sorts the (token, slot) pairs by expert so each expert runs one matmul on its own tokens
(one `grouped_mm` for all experts where torch supports it; in bf16 on CPU each expert's rows are padded
to a multiple of 16, see `_padded_grouped_swiglu`; in fp32 on CPU the backward is written out, `KeptGradSwiGLU`,
so the weight gradients reuse kept buffers); there is no per-token Python loop. For compiled decoding,
`RoutedExperts.gathered` reads each token's k experts by index instead (no sort, no host sync).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import Expert, KeptGradCast, workspace

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def expert_load(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Number of routed slots each expert received (float, shape (n_experts,))."""
    flat = indices.reshape(-1)
    return torch.zeros(n_experts, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))


def balance_loss(probs: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """N * sum_i f_i * P_i (unweighted): f_i = share of routed slots on expert i, P_i = mean probability.

    Equals 1 for perfectly uniform routing and N when every token picks the same expert with certainty.
    `probs` are (tokens, N) router probabilities summing to 1 per token.
    """
    n = probs.shape[-1]
    f = load / load.sum().clamp(min=1)
    return n * (f * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(router logits)^2 (unweighted)."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


class Gate(nn.Module):
    """Router: affinity scores, (group-limited) top-k selection, gating weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk, self.n_experts = cfg.n_activated_experts, cfg.n_routed_experts
        self.n_groups, self.topk_groups, self.group_score = cfg.n_expert_groups, cfg.n_limited_groups, cfg.group_score
        self.score_func, self.norm, self.route_scale = cfg.score_func, cfg.topk_norm, cfg.route_scale
        self.bias_update_speed = cfg.bias_update_speed
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))  # centroids e_i
        # b_i of aux-loss-free balancing: saved with the model, changed only by update_bias()
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts), persistent=True)
        # routed slots per expert since the last update_bias() (training only)
        self.register_buffer("step_load", torch.zeros(cfg.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor):
        """x: (tokens, dim) -> gates (tokens, k), indices (tokens, k), probs (tokens, N), logits (tokens, N)."""
        with torch.autocast(x.device.type, enabled=False):  # the router runs in fp32
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        select = scores + self.bias  # the bias steers selection only
        if self.n_groups > 1:  # keep the best n_limited_groups groups; mask the rest with -inf
            grouped = select.view(x.shape[0], self.n_groups, -1)
            if self.group_score == "max":  # DeepSeek-V2: a group ranks by its best expert
                group_score = grouped.amax(dim=-1)
            else:  # DeepSeek-V3: by the sum of its two best
                group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = group_score.topk(self.topk_groups, dim=-1).indices
            masked = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
            select = grouped.masked_fill(masked.unsqueeze(-1), float("-inf")).flatten(1)
        indices = select.topk(self.topk, dim=-1).indices
        gates = scores.gather(1, indices)
        if self.norm:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        gates = gates * self.route_scale
        probs = scores if self.score_func == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
        return gates, indices, probs, logits

    @torch.no_grad()
    def update_bias(self) -> None:
        """b_i += speed * sign(mean load - load_i), once per optimizer step (DeepSeek-V3 §2.1.2)."""
        if self.bias_update_speed > 0 and self.step_load.sum() > 0:
            self.bias += self.bias_update_speed * torch.sign(self.step_load.mean() - self.step_load)
        self.step_load.zero_()


class RoutedExperts(nn.Module):
    """N_r SwiGLU experts with stacked weights: w1, w3 (N, dim, inter) and w2 (N, inter, dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n, d, i = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        self.w1 = nn.Parameter(torch.empty(n, d, i))  # gate projection of each expert
        self.w3 = nn.Parameter(torch.empty(n, d, i))  # up projection
        self.w2 = nn.Parameter(torch.empty(n, i, d))  # down projection (a residual output)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, load: torch.Tensor):
        """x (tokens, dim); indices, gates (tokens, k); load (N,) slots per expert -> (tokens, dim)."""
        k = indices.shape[1]
        order = indices.reshape(-1).argsort(stable=True)  # (token, slot) pairs grouped by expert
        token = order // k
        w1, w2, w3 = self.w1, self.w2, self.w3
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        cpu = x.device.type == "cpu"
        if dt != w1.dtype:  # grouped_mm is not on autocast's list; the CPU trains with kept weight gradients
            kept = cpu and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            cast = KeptGradCast.apply if kept else (lambda w, d: w.to(d))
            w1, w2, w3 = cast(w1, dt), cast(w2, dt), cast(w3, dt)
        g = gates.reshape(-1)[order].unsqueeze(-1).to(dt)  # each sorted pair's gate g_i,t
        if cpu and _HAS_GROUPED_MM and dt == torch.bfloat16 and torch.is_grad_enabled():
            ys = _padded_grouped_swiglu(x.to(dt), token, w1, w2, w3, load, g)
        else:
            xs = x.index_select(0, token).to(dt)  # backward: index_add_, faster on CPU than x[token]'s index_put
            if cpu and not torch.is_grad_enabled():  # inference: CPU grouped_mm visits empty experts too
                ys = _looped_swiglu(xs, w1, w2, w3, load, g)
            elif _HAS_GROUPED_MM and dt == torch.bfloat16:
                ys = _grouped_swiglu(xs, w1, w2, w3, load, g)
            elif _HAS_GROUPED_MM and cpu:  # fp32: weight gradients into kept buffers
                ys = _kept_grad_swiglu(xs, w1, w2, w3, load, g)
            else:
                ys = _looped_swiglu(xs, w1, w2, w3, load, g)
        return torch.zeros(x.shape, dtype=ys.dtype, device=x.device).index_add_(0, token, ys).to(x.dtype)

    def gathered(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """The same output for a few tokens (compiled decoding, DeepSeekV3.decode_step): each token's k experts are
        read by index, with no sort, host sync or data-dependent shape. Written as products and sums that
        torch.compile fuses into loops over the chosen experts' weights in place; run eagerly, it would build
        (tokens, k, dim, inter) tensors."""
        a1 = (x[:, None, :, None] * self.w1[indices]).sum(2)  # (tokens, k, inter)
        a3 = (x[:, None, :, None] * self.w3[indices]).sum(2)
        y = ((F.silu(a1) * a3).unsqueeze(-1) * self.w2[indices]).sum(2)  # (tokens, k, dim)
        return (gates.unsqueeze(-1).to(y.dtype) * y).sum(1).to(x.dtype)


def _grouped_swiglu(xs, w1, w2, w3, load, g):
    """Every expert's SwiGLU on its contiguous slice of the expert-sorted rows, times each row's gate g (rows, 1):
    one grouped_mm per weight. The gate scales the inter-wide hidden row before w2 (the same product, since w2 is
    linear), a third of the work of scaling the dim-wide output, forward and backward."""
    offs = load.cumsum(0).to(torch.int32)
    h = F.silu(F.grouped_mm(xs, w1, offs=offs)) * F.grouped_mm(xs, w3, offs=offs) * g
    return F.grouped_mm(h, w2, offs=offs)


class KeptGradSwiGLU(torch.autograd.Function):
    """`_grouped_swiglu` in fp32 on the CPU, with the backward written out so that the experts' weight gradients
    land in buffers kept from step to step (`layers.workspace`, reused only when nothing holds them), as the fused
    head's dW does. grouped_mm's own backward allocates three fresh (experts, dim, inter) gradients per layer; on
    a 2-core VM faulting their pages in (and zero-filling the slices of experts that got no rows) took a large,
    variable share of a 174m step (`benchmarks/README.md`). Same products as grouped_mm's backward."""

    @staticmethod
    def forward(ctx, xs, w1, w2, w3, g, offs):
        a1, a3 = F.grouped_mm(xs, w1, offs=offs), F.grouped_mm(xs, w3, offs=offs)
        s1 = F.silu(a1)
        ctx.save_for_backward(xs, w1, w2, w3, g, offs, a1, a3)
        return F.grouped_mm(s1 * a3 * g, w2, offs=offs)

    @staticmethod
    def backward(ctx, dy):
        xs, w1, w2, w3, g, offs, a1, a3 = ctx.saved_tensors
        s1 = F.silu(a1)
        dh = F.grouped_mm(dy, w2.transpose(1, 2), offs=offs)  # d(hidden row), hidden = silu(a1) * a3 * g
        dhg = dh * g
        da3 = dhg * s1
        da1 = torch.ops.aten.silu_backward(dhg * a3, a1)  # silu'(a) = sigmoid(a) (1 + a (1 - sigmoid(a)))
        dg = (dh * (s1 * a3)).sum(-1, keepdim=True)
        dxs = F.grouped_mm(da1, w1.transpose(1, 2), offs=offs)
        dxs.add_(F.grouped_mm(da3, w3.transpose(1, 2), offs=offs))  # in place: no third fresh (rows, dim) tensor
        h = s1 * a3 * g
        bounds = [0] + offs.tolist()
        grads = []
        for i, (w, a, b) in enumerate(((w1, xs, da1), (w2, h, dy), (w3, xs, da3))):  # dW[e] = a_e^T @ b_e
            if not ctx.needs_input_grad[1 + i]:
                grads.append(None)
                continue
            dw = workspace(w, "dw", w.shape, w.dtype, w.device).view(w.shape)
            for e in range(w.shape[0]):
                lo, hi = bounds[e], bounds[e + 1]
                if hi > lo:
                    torch.mm(a[lo:hi].t(), b[lo:hi], out=dw[e])
                else:
                    dw[e].zero_()
            grads.append(dw)
        return dxs, grads[0], grads[1], grads[2], dg, None


@torch.compiler.disable  # fp32 under torch.compile: a graph break (torch's CPU grouped_mm check asks for bf16)
def _kept_grad_swiglu(xs, w1, w2, w3, load, g):
    return KeptGradSwiGLU.apply(xs, w1, w2, w3, g, load.cumsum(0).to(torch.int32))

CPU_BF16_ROWS = 16  # on CPU, bf16 expert groups are padded to a multiple of this many rows (see below)


@torch.compiler.disable
def _padded_grouped_swiglu(x, token, w1, w2, w3, load, g):
    """`_grouped_swiglu` for bf16 on CPU, each expert's rows padded with zero rows to a multiple of CPU_BF16_ROWS.

    oneDNN builds (JIT-compiles) a bf16 matmul kernel for every new shape. The rows per expert change every
    step, so each step compiled hundreds of kernels; with counts rounded up to a multiple of 16 the shapes
    repeat and the kernels come from oneDNN's cache after warm-up.
    x (tokens, dim); token: the source row of each expert-sorted (token, slot) pair -> their outputs, in order."""
    m = CPU_BF16_ROWS
    counts = load.long()
    padded = (counts + m - 1) // m * m
    shift = (padded.cumsum(0) - padded) - (counts.cumsum(0) - counts)  # how far each expert's block moves
    dest = torch.arange(token.numel(), device=x.device) + shift.repeat_interleave(counts)  # real rows, padded layout
    src = torch.full((int(padded.sum()),), x.shape[0], dtype=torch.long, device=x.device)
    src[dest] = token  # padding rows read the zero row appended below
    xs = F.pad(x, (0, 0, 0, 1)).index_select(0, src)
    g_pad = g.new_zeros(src.shape[0], 1).index_copy(0, dest, g)  # padding rows: gate 0 (their rows are 0 anyway)
    return _grouped_swiglu(xs, w1, w2, w3, padded, g_pad).index_select(0, dest)


@torch.compiler.disable  # under torch.compile, the counts would become guards: a recompile per new load
def _looped_swiglu(xs, w1, w2, w3, load, g):
    """The same with one matmul per expert that received rows (a host sync for the counts). Decoding one token
    on CPU touches 2 of 8 experts: 6 matmuls per layer instead of grouped_mm's 24 (it visits empty groups)."""
    outs, start = [], 0
    for e, n in enumerate(load.long().tolist()):
        if n:
            xe = xs[start:start + n]
            outs.append((F.silu(xe @ w1[e]) * (xe @ w3[e]) * g[start:start + n]) @ w2[e])
            start += n
    return torch.cat(outs) if outs else xs.new_zeros(0, w2.shape[-1])


class MoE(nn.Module):
    """Shared experts (always on) + routed experts chosen by the gate."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = RoutedExperts(cfg)
        shared = cfg.n_shared_experts * cfg.moe_inter_dim  # N_s experts fused into one wider SwiGLU
        self.shared_experts = Expert(cfg.dim, shared) if shared else None
        self.register_buffer("last_load", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.trace = False  # when True, keep the last forward's top-k ids and gates in last_topk
        self.last_topk: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, losses: bool = True, gathered: bool = False):
        """x (B, T, dim) -> (output, balance loss, z-loss); the losses are unweighted (None when losses=False:
        decoding has no use for them). gathered=True: the routed experts by `RoutedExperts.gathered`."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        gates, indices, probs, logits = self.gate(x)
        load = expert_load(indices, self.gate.n_experts)
        y = self.experts.gathered(x, indices, gates) if gathered else self.experts(x, indices, gates, load)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        with torch.no_grad():
            self.last_load.copy_(load)
            if self.training:
                self.gate.step_load += load
        if self.trace:
            self.last_topk = (indices.view(*shape[:-1], -1), gates.view(*shape[:-1], -1))
        if not losses:
            return y.view(shape), None, None
        return y.view(shape), balance_loss(probs, load), router_z_loss(logits)
