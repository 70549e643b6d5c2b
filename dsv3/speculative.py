"""Self-speculative decoding with the model's own multi-token prediction modules (DeepSeek-V3 §2.2) as the draft.

Each round, with tokens t_0 .. t_{n-1} decided and the main model's hidden states h_0 .. h_{n-2} known:
  draft   -- depth k (k = 1 .. D) reads h^{k-1} and the tokens k ahead and proposes d_k for position n + k - 1;
             depth k > 1 reads the drafts of the depths before it (the causal chain of eq. 21-23). A model with
             fewer trained modules than D reuses its last one on its own output (as SGLang and TensorRT-LLM do);
             every depth has its own layer of the MTP cache. The draft scores only the K most frequent tokens'
             rows of the shared head (`draft_head`, FR-Spec arXiv 2502.14856): greedy takes their argmax, sampling
             draws from their renormalised distribution (q = 0 outside them);
  verify  -- the main model runs [t_{n-1}, d_1 .. d_D] in ONE static step over its latent cache
             (`DeepSeekV3.decode`, compiled with compile=True): D + 1 logits from the full head;
  accept  -- greedy: d_j is kept while it equals the main model's argmax; temperature > 0: the speculative
             sampling rule (sampling.accept_ratio, sampling.residual): keep d_j with probability min(1, p/q), at
             the first rejection draw from normalise(max(0, p - q)), after D acceptances one bonus token from the
             last p. p is plain sampling's distribution, so every kept token is distributed exactly as plain
             sampling's, whatever the draft vocabulary;
  rollback-- the cache position moves back to the last kept token: slots past it hold stale latents that no query
             sees (the step masks every slot past its query) and the next step overwrites.
A batch keeps the fewest tokens any row accepted this round (every row then takes the token at that slot: its
accepted draft, or its correction), so all rows share one cache position.
The MTP depths re-read a window of the last D + 1 positions every round (the first round: the whole prompt): it
covers every entry computed from a draft that was since rejected, so the MTP cache needs no bookkeeping, and its
shapes are static like the verifying step's.
"""

from __future__ import annotations

import contextlib

import torch

from .cache import KVCache
from .layers import linear
from .model import static_step
from .sampling import accept_ratio, draw, probabilities, residual, sample
from .threads import governed
from .trace import Routes

DRAFT_VOCAB = 4096  # default K: the draft scores the 4096 most frequent tokens' rows of the head (benchmarks/README)


def vocabulary_ranking(model) -> torch.Tensor:
    """Every token id, most frequent first. By `model.token_counts` (the training split's counts, which training
    stores with the checkpoint) when the model has them; otherwise by id, which for byte-level BPE vocabularies
    such as GPT-2's r50k_base is the merge rank: a lower id was merged earlier, from a more frequent pair."""
    counts = getattr(model, "token_counts", None)
    V = model.cfg.vocab_size
    if counts is None:
        return torch.arange(V)
    return torch.argsort(-counts.double().cpu(), stable=True)  # ties keep the lower id first


def draft_rows(model, draft_vocab: int) -> int:
    """How many rows of the head the draft scores: draft_vocab, with 0 (or more than the vocabulary) = all."""
    V = model.cfg.vocab_size
    return V if draft_vocab == 0 or draft_vocab >= V else draft_vocab


def draft_head(model, draft_vocab: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(ids (K,), W_K (K, dim)): the head rows the draft scores, the K most frequent tokens' (`vocabulary_ranking`);
    (None, the whole head) for the full vocabulary. The sub-matrix is built once per model and kept on it until
    the head's weights change (a training step), never per token."""
    w = model.head.weight
    K = draft_rows(model, draft_vocab)
    if K == model.cfg.vocab_size:
        return None, w
    key = (K, w.data_ptr(), w._version, w.dtype, w.device, id(getattr(model, "token_counts", None)))
    kept = model.__dict__.get("_draft_head")
    if kept is None or kept[0] != key:
        ids = vocabulary_ranking(model)[:K].to(w.device)
        kept = model.__dict__["_draft_head"] = (key, ids, w.detach().index_select(0, ids))
    return kept[1], kept[2]


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
    ok = u <= accept_ratio(p[:, :k], q, d)
    res = residual(p[:, :k], q)
    for j in range(k):
        fix[:, j] = draw(res[:, j], generator)
    fix[:, k] = draw(p[:, k], generator)
    return ok.long().cumprod(1).sum(1), fix


class _Speculation:
    """One speculative generation's state: the sequence, both caches, the main model's hidden states, the draft's
    head rows; `main`, `propose` and `accept` are the three parts of a round (module docstring)."""

    def __init__(self, model, seq, key_mask, sampling, cache, trace, compile, draft_vocab, n_drafts):
        self.model, self.seq, self.trace, self.compile = model, seq, trace, compile
        self.temperature, self.top_k, self.top_p, self.gen = sampling
        device, cfg = seq.device, model.cfg
        self.D = n_drafts or cfg.n_mtp_layers
        self.W = self.D + 1  # positions per verifying step, and per drafting window
        B, N = seq.shape
        dtype = torch.bfloat16 if device.type == "cuda" else None
        self.kv = model.new_cache(B, N, absorb=cache == "absorbed", dtype=dtype)  # the main model's
        self.mkv = KVCache(cfg.replace(n_layers=self.D, n_dense_layers=0), B, N, absorb=cache == "absorbed",
                           device=device, dtype=dtype or model.embed.weight.dtype)  # layer k - 1 for depth k
        self.kv.key_mask = self.mkv.key_mask = key_mask
        self.ids, self.w_draft = draft_head(model, draft_vocab)
        self.hid = None  # (B, N, dim) the main model's last hidden states (after its final norm): depth 1's input
        self.moes = model.moe_layers()
        self.routes: list[Routes] = []  # with a trace: one observer per MoE gate (trace.py)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        self.fast = (static_step, linear, contextlib.nullcontext)
        if compile:
            from .kernels.decode import compiled_head, compiled_step, graphs_allowed

            self.fast = (compiled_step(static_step, device.type), compiled_head(device.type), graphs_allowed)

    def main(self, start: int, end: int) -> torch.Tensor:
        """The main model over positions [start, end) against its cache: logits (B, end - start | 1, V) in fp32;
        its hidden states are kept for the MTP modules. The prompt is one forward, the rest the static step."""
        model, seq = self.model, self.seq
        with self.autocast:
            if start == 0:
                out = model(seq[:, :end], cache=self.kv, last_logits=True)
            else:
                out = model.decode(seq[:, start:end], self.kv, compiled=self.compile and end - start == self.W)
        if self.hid is None:
            self.hid = out.hidden.new_empty(*seq.shape, model.cfg.dim)
        self.hid[:, start:end] = out.hidden
        return out.logits.float()

    def route(self, keep: int) -> None:
        """Trace the routing of the first `keep` positions of the main model's last forward (the kept ones)."""
        if self.routes:
            self.trace.append(Routes.stack(self.routes, slice(None, keep)))

    def propose(self, n: int, s: int, k_use: int) -> list:
        """MTP depths 1..k_use over positions [s, n - 1) (their caches are valid below s): the drafts go to
        seq[:, n .. n + k_use - 1]; returns each depth's draft distribution q over the vocabulary (None: greedy)."""
        model, seq, mkv = self.model, self.seq, self.mkv
        pos = torch.arange(s, n - 1, device=seq.device)
        cos, sin = model.rope_cos.index_select(0, pos), model.rope_sin.index_select(0, pos)
        mkv.pos = s
        mask = mkv.mask(n - 1 - s, whole_cache=True)
        fast = self.compile and n - 1 - s == self.W
        step, head, graphs = self.fast if fast else (static_step, linear, contextlib.nullcontext)
        h, qs = self.hid[:, s:n - 1], []
        for k in range(1, k_use + 1):
            layer = model.mtp[min(k, len(model.mtp)) - 1]  # deeper than trained: the last module again
            with self.autocast, graphs():
                h = step(layer, (h, model.embed(seq[:, s + k:n - 1 + k]), cos, sin), mkv.slots(k - 1, pos), mask)
                logits = head(h[:, -1:], self.w_draft)[:, 0].float()  # (B, K): the draft vocabulary's rows only
            if self.temperature == 0:
                choice, q = logits.argmax(-1), None
            else:
                q = probabilities(logits, self.temperature, self.top_k, self.top_p)
                choice = draw(q, self.gen)
                if self.ids is not None:  # q over the whole vocabulary: 0 outside the draft's rows
                    q = q.new_zeros(q.shape[0], model.cfg.vocab_size).index_copy_(1, self.ids, q)
            seq[:, n - 1 + k] = choice if self.ids is None else self.ids[choice]
            qs.append(q)
        return qs

    def accept(self, logits: torch.Tensor, qs: list, n: int, k_use: int) -> int:
        """Judge the drafts seq[:, n .. n + k_use - 1] against the main model's logits (B, k_use + 1, V), write
        the token of slot a, the first slot some row rejected (or the bonus slot), and return a."""
        d = self.seq[:, n:n + k_use]
        q = torch.stack(qs, 1) if qs and self.temperature > 0 else None
        kept, fix = judge(logits, q, d, self.temperature, self.top_k, self.top_p, self.gen)
        a = int(kept.min())
        # rows that accepted d_{a+1} keep it (a valid sample of their own p); the others take their correction
        self.seq[:, n + a] = torch.where(kept > a, d[:, a], fix[:, a]) if a < k_use else fix[:, a]
        return a


@torch.inference_mode()
def speculative_loop(model, seq, P, key_mask, sampling, cache, trace=None, drafts=None, depths=None,
                     compile=False, draft_vocab=DRAFT_VOCAB, n_drafts=None):
    """generate's loop with MTP drafts: seq (B, N) holds the prompts in [:, :P] (key_mask: their real tokens, or
    None); yields (B,) ids one position at a time, like generate's loop. `drafts` (a list, or None): one (B,) tensor
    per yielded position, the draft proposed for it (-1: none, the main model chose it alone); `depths` (a list, or
    None): per yielded position, the depth 1 .. D that drafted it (0: none). n_drafts: D (default: the model's
    n_mtp_layers). compile=True: the verifying and drafting steps of full width (D + 1 positions) run compiled."""
    sp = _Speculation(model, seq, key_mask, sampling, cache, trace, compile, draft_vocab, n_drafts)
    B, N = seq.shape
    was_training = model.training
    model.eval()
    sp.routes = Routes.attach(sp.moes, B) if trace is not None else []
    try:
        with governed(seq.device, compile) as tick:  # fewer threads while another job shares the CPU (threads.py)
            logits = sp.main(0, P)[:, -1]
            sp.route(P)
            none = torch.full((B,), -1, dtype=torch.long, device=seq.device)
            n, s = P, 0  # n tokens decided (yielded or about to be); the first window covers the whole prompt
            if N > P:
                seq[:, P] = sample(logits, *sampling)
            pending = [(none, 0)]  # the draft behind each decided token not yet yielded, and its depth
            while True:
                for proposal, depth in pending:
                    if n == N:
                        break
                    n += 1
                    if drafts is not None:
                        drafts.append(proposal)
                    if depths is not None:
                        depths.append(depth)
                    yield seq[:, n - 1]
                if n == N:
                    break
                k_use = min(sp.D, N - n - 1)  # drafts that can still be kept within max_new_tokens
                qs = sp.propose(n, s, k_use) if k_use else []
                proposed = seq[:, n:n + k_use].clone()
                a = sp.accept(sp.main(n - 1, n + k_use), qs, n, k_use)
                sp.route(a + 1)  # the kept positions t_{n-1}, d_1 .. d_a
                sp.kv.pos = n + a  # rollback: the slots of rejected drafts are overwritten by the next step
                s = max(0, n + a - sp.W)  # the next window ends at n + a - 1 and covers every entry built on a draft
                pending = [(proposed[:, j], j + 1) if j < k_use else (none, 0) for j in range(a + 1)]
                tick()
            if trace is not None and N > P:  # route the last token too, as generate's loop does
                sp.main(N - 1, N)
                sp.route(1)
    finally:
        model.train(was_training)
        Routes.detach(sp.moes, sp.routes)
