"""DeepSeekMoE (DeepSeek-V3 §2.1.2), in the paper's order: the layer (eq. 12), its routed experts, the router
(eq. 13-16), then the balancing losses.

h'_t = u_t + sum_i FFN^(s)_i(u_t) + sum_i g_i,t FFN^(r)_i(u_t)                       (eq. 12)
g_i,t = g'_i,t / sum_j g'_j,t, g'_i,t = s_i,t on the top-k experts, else 0            (eq. 13-14)
s_i,t = Sigmoid(u_t^T e_i)                          (eq. 15; DeepSeek-V2 used Softmax_i, its eq. 22)
Top-k selection uses s_i,t + b_i, with b the auxiliary-loss-free bias (selection only, eq. 16); the gates g
come from the unbiased s: renormalised over the top-k for sigmoid (eq. 13), not for softmax (V2), then times
route_scale. Group-limited routing first keeps the n_limited_groups best of n_expert_groups groups.
Losses: the balance loss alpha * N * sum_i f_i P_i (V2 eq. 23-25) and the router z-loss
mean_t logsumexp(logits_t)^2 (ST-MoE, Zoph et al. 2022); the bias b moves by gamma * sign(mean load - load_i)
after each step (V3 §2.1.2).
Faster dispatch (tokens sorted by expert, grouped GEMMs) lives in kernels/experts.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import ModelConfig
from .layers import Expert


class MoE(nn.Module):
    """Shared experts (always on) + routed experts chosen by the gate (eq. 12, without the residual)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = RoutedExperts(cfg)
        shared = cfg.n_shared_experts * cfg.moe_inter_dim  # N_s experts are one SwiGLU N_s times as wide
        self.shared_experts = Expert(cfg.dim, shared) if shared else None
        # routed slots per expert of the last forward (for plots: DeepSeekV3.expert_loads)
        self.register_buffer("last_load", torch.zeros(cfg.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor, losses: bool = True):
        """x (B, T, dim) -> (output, balance loss, z-loss); the losses are unweighted (None when losses=False:
        decoding has no use for them)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        gates, indices, probs, logits = self.gate(x)
        y = self.experts(x, indices, gates)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        load = self.record(indices)
        if not losses:
            return y.view(shape), None, None
        return y.view(shape), balance_loss(probs, load), router_z_loss(logits)

    @torch.no_grad()
    def record(self, indices: torch.Tensor) -> torch.Tensor:
        """Bookkeeping for plots and the bias update: the forward's routed load per expert."""
        load = expert_load(indices, self.gate.n_experts)
        self.last_load.copy_(load)
        if self.training:
            self.gate.step_load += load
        return load


class RoutedExperts(nn.Module):
    """N_r SwiGLU experts FFN^(r)_i with stacked weights: w1, w3 (N, dim, inter) and w2 (N, inter, dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n, d, i = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        self.w1 = nn.Parameter(torch.empty(n, d, i))  # gate projection of each expert
        self.w3 = nn.Parameter(torch.empty(n, d, i))  # up projection
        self.w2 = nn.Parameter(torch.empty(n, i, d))  # down projection (a residual output)

    def expert(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """FFN^(r)_i(x): expert i's SwiGLU on rows x (n, dim)."""
        return (F.silu(x @ self.w1[i]) * (x @ self.w3[i])) @ self.w2[i]

    def forward(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """sum_i g_i,t FFN^(r)_i(x_t) over each token's top-k experts (eq. 12's routed term).
        x (tokens, dim); indices, gates (tokens, k)."""
        return routed_experts(self, x, indices, gates)


@kernels.fast_path(kernels.moe_routed_experts)
def routed_experts(experts: RoutedExperts, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor):
    """One expert at a time, on the tokens that chose it (as DeepSeek's inference code does)."""
    y = torch.zeros_like(x)
    for i in range(experts.w1.shape[0]):
        token, slot = torch.where(indices == i)
        if token.numel():
            y = y.index_add(0, token, (gates[token, slot, None] * experts.expert(i, x[token])).to(y.dtype))
    return y


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
        # callables f(indices, gates) told of every forward's choice: generation attaches its routing trace here
        self.observers: list = []

    def forward(self, x: torch.Tensor):
        """x: (tokens, dim) -> gates (tokens, k), indices (tokens, k), probs (tokens, N), logits (tokens, N)."""
        with torch.autocast(x.device.type, enabled=False):  # the router runs in fp32
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()  # eq. 15
        select = scores + self.bias  # eq. 16: the bias steers selection only, never the gate values
        if self.n_groups > 1:  # group-limited routing: keep the best n_limited_groups groups, mask the rest
            grouped = select.view(x.shape[0], self.n_groups, -1)
            if self.group_score == "max":  # DeepSeek-V2: a group ranks by its best expert
                group_score = grouped.amax(dim=-1)
            else:  # DeepSeek-V3: by the sum of its two best
                group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = group_score.topk(self.topk_groups, dim=-1).indices
            masked = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
            select = grouped.masked_fill(masked.unsqueeze(-1), float("-inf")).flatten(1)
        indices = select.topk(self.topk, dim=-1).indices  # eq. 14 with eq. 16's biased scores
        gates = scores.gather(1, indices)  # g'_i,t = s_i,t: the unbiased score
        if self.norm:  # eq. 13: the top-k sigmoid scores renormalised to sum to 1
            gates = gates / gates.sum(dim=-1, keepdim=True)
        gates = gates * self.route_scale
        # P_i of the balance loss needs a distribution over experts: sigmoid scores are normalised first
        probs = scores if self.score_func == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
        for observe in self.observers:
            observe(indices, gates)
        return gates, indices, probs, logits

    @torch.no_grad()
    def update_bias(self) -> None:
        """b_i += speed * sign(mean load - load_i), once per optimizer step (DeepSeek-V3 §2.1.2)."""
        if self.bias_update_speed > 0 and self.step_load.sum() > 0:
            self.bias += self.bias_update_speed * torch.sign(self.step_load.mean() - self.step_load)
        self.step_load.zero_()


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
