"""Self-speculative decoding with the model's own multi-token prediction modules (DeepSeek-V3 §2.2) as the draft.

Each round, with tokens t_0 .. t_{n-1} decided and the main model's hidden states h_0 .. h_{n-2} known:
  draft   -- MTP depth k (k = 1 .. D) reads h^{k-1} and the tokens k ahead and proposes d_k for position n + k - 1;
             depth k > 1 reads the drafts of the depths before it (the causal chain of eq. 21-23);
  verify  -- the main model runs [t_{n-1}, d_1 .. d_D] in ONE forward over its latent cache: D + 1 logits;
  accept  -- greedy: d_j is kept while it equals the main model's argmax; temperature > 0: the speculative
             sampling rule (Leviathan et al. 2023; Chen et al. 2023): keep d_j with probability min(1, p(d_j) /
             q(d_j)), at the first rejection draw from normalise(max(0, p - q)) instead, and after D acceptances
             draw one bonus token from the last p. p and q are the same temperature / top-k / top-p distributions
             that plain sampling uses, so every kept token is distributed exactly as plain sampling's;
  rollback-- the cache position moves back to the last kept token: slots past it hold stale latents that the next
             forward overwrites before any query can see them (the eager paths read only slots below the position;
             the compiled step masks every slot past its query).
A batch keeps the fewest tokens any row accepted this round (every row then takes the token at that slot: its
accepted draft, or its correction), so all rows share one cache position; each row's tokens are still its own
plain-decoding tokens (greedy) or samples from its own model distribution.
The MTP blocks have their own latent cache (one layer per depth), which is rolled back the same way: an entry of
depth k at position j is valid once t_{j+k} is decided. Greedy output is identical to plain greedy decoding.
"""

from __future__ import annotations

import torch

from .cache import KVCache
from .generate import Routes, _sequence, draw, probabilities, sample
from .threads import governed


def verify_compiled(model, tokens: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
    """model(tokens, cache=cache) for T new positions per row, tokens (B, T), with static shapes: the blocks'
    one-token step (`kernels.decode.block_decode`, torch.compile'd as in `DeepSeekV3.decode_step`) over T positions
    at once, against the whole absorbed cache under a mask. -> logits (B, T, V) and the hidden states after the
    final norm (B, T, dim)."""
    from .kernels.decode import compiled_block_decode, graphs_allowed

    dev = model.rope_cos.device
    T = tokens.shape[1]
    pos = torch.arange(cache.pos, cache.pos + T, device=dev)
    cos, sin = model.rope_cos.index_select(0, pos), model.rope_sin.index_select(0, pos)
    mask = cache.mask(T, whole_cache=True)  # causal over the written slots, minus padding
    x = model.embed(tokens)
    step = compiled_block_decode(dev.type)
    with graphs_allowed():
        for block in model.layers:
            x = step(block, x, cos, sin, cache.c_kv[block.layer_id], cache.k_pe[block.layer_id], pos, mask)
    cache.pos += T
    h = model.norm(x)
    return model.head(h), h


def judge(logits: torch.Tensor, q: torch.Tensor | None, d: torch.Tensor, temperature: float, top_k: int = 0,
          top_p: float = 1.0, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The acceptance rule for k drafts d (B, k) drawn from q (B, k, V) (None when greedy), given the main model's
    logits (B, k + 1, V) at the positions before each draft and after the last.
    -> kept (B,): how many leading drafts each row accepts; fix (B, k + 1): the token a row takes at slot j when it
    rejects d_j there (j < k), or when it accepted every draft (j = k, the bonus token).
    Greedy: d_j is accepted while it is the main model's argmax, and fix is that argmax. Otherwise d_j is accepted
    with probability min(1, p(d_j) / q(d_j)), fix[:, j] is drawn from normalise(max(0, p_j - q_j)) and the bonus
    from p_k, where p = `probabilities` of the logits: each row's kept tokens are then distributed as p."""
    k = d.shape[1]
    if temperature == 0:
        best = logits.argmax(-1)
        return (best[:, :k] == d).long().cumprod(1).sum(1), best
    p = torch.stack([probabilities(logits[:, j], temperature, top_k, top_p) for j in range(k + 1)], 1)
    fix = torch.empty_like(logits[..., 0], dtype=torch.long)
    if k == 0:
        fix[:, 0] = draw(p[:, 0], generator)
        return fix.new_zeros(fix.shape[0]), fix
    u = torch.rand(d.shape, generator=generator, device=generator.device if generator else d.device).to(d.device)
    ok = u * q.gather(-1, d[..., None])[..., 0] <= p[:, :k].gather(-1, d[..., None])[..., 0]
    res = (p[:, :k] - q).clamp(min=0)  # where p = q a rejection has probability 0; p keeps the draw defined
    res = torch.where(res.sum(-1, keepdim=True) > 0, res, p[:, :k])
    for j in range(k):
        fix[:, j] = draw(res[:, j], generator)  # multinomial normalises
    fix[:, k] = draw(p[:, k], generator)
    return ok.long().cumprod(1).sum(1), fix


@torch.inference_mode()
def speculative_loop(model, tokens, max_new_tokens, sampling, cache, key_mask, trace, drafts, compile=False):
    """generate._loop with MTP drafts: yields (B,) ids one position at a time, like it. `drafts` (a list, or None):
    one (B,) tensor per yielded position, the draft proposed for it (-1: none, the main model chose it alone).
    compile=True: the verifying forwards go through the compiled static-shape blocks (`verify_compiled`); the
    prompt and the MTP module run eagerly."""
    temperature, top_k, top_p, gen = sampling
    greedy = temperature == 0
    device = model.embed.weight.device
    cfg, D = model.cfg, model.cfg.n_mtp_layers
    B, P = tokens.shape
    N = P + max_new_tokens
    seq, key_mask = _sequence(model, tokens, max_new_tokens, key_mask)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    kv = model.new_cache(B, N, absorb=cache == "absorbed", dtype=dtype)  # the main model's
    mkv = KVCache(cfg.replace(n_layers=D, n_dense_layers=0), B, N, absorb=cache == "absorbed", device=device,
                  dtype=dtype or model.embed.weight.dtype)  # the MTP blocks', layer k - 1 for depth k
    kv.key_mask = mkv.key_mask = key_mask
    hid = None  # (B, N, dim) the main model's last hidden states (after its final norm): depth 1's input
    moes = model.moe_layers()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def main(start: int, end: int, last_only: bool = False) -> torch.Tensor:
        """The main model over positions [start, end) against its cache: logits (B, end - start | 1, V) in fp32;
        its hidden states are kept for the MTP modules."""
        nonlocal hid
        with autocast:
            if compile and start > 0 and trace is None:
                logits, hidden = verify_compiled(model, seq[:, start:end], kv)
            else:
                out = model(seq[:, start:end], cache=kv, last_logits=last_only)
                logits, hidden = out.logits, out.hidden
        if hid is None:
            hid = hidden.new_empty(B, N, cfg.dim)
        hid[:, start:end] = hidden
        return logits.float()

    def route(keep: int) -> None:
        """Trace the routing of the first `keep` positions of the main model's last forward (the kept ones)."""
        if routes:
            trace.append(Routes.stack(routes, slice(None, keep)))

    def propose(n: int, s: int, k_use: int) -> list:
        """MTP depths 1..k_use over positions [s, n - 1) (their caches are valid below s): the drafts go to
        seq[:, n .. n + k_use - 1]; returns each depth's draft distribution q (None when greedy)."""
        h, qs = hid[:, s:n - 1], []
        cos, sin = model.rope_cos[s:n - 1], model.rope_sin[s:n - 1]
        for k in range(1, k_use + 1):
            mkv.pos = s
            with autocast:
                h, _, _ = model.mtp[k - 1](h, model.embed(seq[:, s + k:n - 1 + k]), cos, sin, mkv,
                                           mkv.mask(n - 1 - s), losses=False)
                logits = model.head(h[:, -1]).float()
            if greedy:
                seq[:, n - 1 + k] = logits.argmax(-1)
                qs.append(None)
            else:
                qs.append(probabilities(logits, temperature, top_k, top_p))
                seq[:, n - 1 + k] = draw(qs[-1], gen)
        mkv.pos = n - 1
        return qs

    def accept(logits: torch.Tensor, qs: list, n: int, k_use: int) -> int:
        """Judge the drafts seq[:, n .. n + k_use - 1] against the main model's logits (B, k_use + 1, V), write
        the token of slot a, the first slot some row rejected (or the bonus slot), and return a."""
        d = seq[:, n:n + k_use]
        kept, fix = judge(logits, torch.stack(qs, 1) if qs and not greedy else None, d, temperature, top_k, top_p,
                          gen)
        a = int(kept.min())
        # rows that accepted d_{a+1} keep it (a valid sample of their own p); the others take their correction
        seq[:, n + a] = torch.where(kept > a, d[:, a], fix[:, a]) if a < k_use else fix[:, a]
        return a

    was_training = model.training
    model.eval()
    routes = Routes.attach(moes, B) if trace is not None else []
    try:
        with governed(device, compile) as tick:  # fewer threads while another job shares the CPU (threads.py)
            logits = main(0, P, last_only=True)[:, -1]
            route(P)
            none = torch.full((B,), -1, dtype=torch.long, device=device)
            n, mtp_pos = P, 0  # n tokens decided (yielded or about to be); MTP caches valid below mtp_pos
            if N > P:
                seq[:, P] = sample(logits, temperature, top_k, top_p, gen)
            pending = [none]  # the draft behind each decided token not yet yielded
            while True:
                for proposal in pending:
                    if n == N:
                        break
                    n += 1
                    if drafts is not None:
                        drafts.append(proposal)
                    yield seq[:, n - 1]
                if n == N:
                    break
                k_use = min(D, N - n - 1)  # drafts that can still be kept within max_new_tokens
                qs = propose(n, mtp_pos, k_use) if k_use else []
                proposed = seq[:, n:n + k_use].clone()
                a = accept(main(n - 1, n + k_use), qs, n, k_use)
                route(a + 1)  # the kept positions t_{n-1}, d_1 .. d_a
                kv.pos = n + a  # rollback: the slots of rejected drafts are overwritten by the next forward
                mtp_pos = max(0, min(n - 1, n + a - k_use + 1))
                pending = [proposed[:, j] if j < k_use else none for j in range(a + 1)]
                tick()
            if trace is not None and N > P:  # route the last token too, as generate._loop does
                main(N - 1, N)
                route(1)
    finally:
        model.train(was_training)
        Routes.detach(moes, routes)
