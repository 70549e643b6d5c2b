"""Choosing the next token from logits, shared by plain decoding (generate.py) and speculative decoding.

Holds
  probabilities(logits, temperature, top_k, top_p) -> the distribution sampling draws from (B, V)
  sample(logits, ...)                               -> greedy (temperature 0) or a draw from `probabilities`
  draw(probs, generator)                            -> one id per row from given probabilities
  accept_ratio(p, q, d), residual(p, q)             -> the speculative sampling rule's two pieces
                                                       (Leviathan et al. 2023; Chen et al. 2023)
Randomness comes only from the `generator` argument, never from the global RNG.
Deliberately not here: models, caches, the decoding loops.
"""

from __future__ import annotations

import torch


def probabilities(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution (B, V), fp32, that `sample` draws from for temperature > 0: softmax(logits / temperature)
    restricted to the top-k and the nucleus (`sample`'s docstring), renormalised."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        p = sorted_logits.softmax(dim=-1)
        drop = p.cumsum(dim=-1) - p >= top_p  # the tokens before this one already reach top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row (B,) from probabilities (B, V), with `generator`'s random stream."""
    device = probs.device
    if generator is not None:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(device)


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next ids (B,) from logits (B, V). temperature 0 = greedy (argmax); top_k 0 and top_p 1 = off.

    top-k keeps the k largest logits; top-p (nucleus, Holtzman et al. 2019) keeps the smallest set of
    most likely tokens whose probability reaches top_p (the most likely token is always kept).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    return draw(probabilities(logits, temperature, top_k, top_p), generator)


def accept_ratio(p: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """min(1, p(d) / q(d)) per draft, the probability of keeping draft d drawn from q: p, q (..., V), d (...).
    q(d) > 0 for every d drawn from q, so the ratio is defined."""
    pd, qd = p.gather(-1, d[..., None])[..., 0], q.gather(-1, d[..., None])[..., 0]
    return (pd / qd).clamp(max=1)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalise(max(0, p - q)) (..., V): what a rejected draft is replaced with, so that the kept token is
    distributed as p. Where p = q a rejection has probability 0; p keeps the row a distribution."""
    res = (p - q).clamp(min=0)
    total = res.sum(-1, keepdim=True)
    return torch.where(total > 0, res / total.clamp(min=1e-30), p)
