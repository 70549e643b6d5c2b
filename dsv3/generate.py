"""Text generation: prefill the prompt once, then decode one token per step from the latent KV cache.

Holds
  generate(model, prompt, ...)         -> str (a list of prompts -> list of str, batched with left padding);
                                          with return_trace=True a `Generation` (ids, per-token texts, routing)
  stream(model, prompt, ...)           -> iterator of text pieces, each yielded once it is valid UTF-8
  generate_tokens(model, tokens, ...)  -> the token-level loop under both: yields (B,) next ids per step
  sample, probabilities, draw          -> sampling.py's, re-exported (greedy / temperature / top-k / top-p)
  add_cli_args, cmd_generate           -> `python -m dsv3 generate` (loads with checkpoint.load_checkpoint)
Cache modes: "absorbed" (default: attention runs against the cached latent c_kv, DeepSeek-V2 §2.1.2),
"naive" (the cached latent is up-projected to per-head keys and values every step) and "none" (the
whole sequence is recomputed every step; for tests and benchmarks). The cache is preallocated for
prompt + max_new_tokens positions. Prompts longer than max_seq_len are refused, never truncated.
compile=True (absorbed cache) runs each one-token step through `DeepSeekV3.decode_step` compiled with
torch.compile: the first call compiles, later ones decode faster than the eager step (`python -m dsv3 bench`,
section decode, prints both and the first compiled run's time).
Text in and out goes through the model's tokenizer: GPT-2's r50k_base for dsv3's own models, an imported
checkpoint's tokenizer.json (`dsv3.from_hf`), whose prompts start with its bos id and end at its eos id.
Randomness comes only from a `torch.Generator` (the `seed` argument), never from the global RNG.
`dsv3.generate` is the function (the package exports it over this module's name): reach the rest
with `from dsv3.generate import generate_tokens, sample`.
speculative=True hands the loop to speculative.py (the model's MTP modules draft over the `draft_vocab` most
frequent tokens, `n_drafts` of them per round, and one static step verifies).
Deliberately not here: beam search, repetition penalties, the checkpoint format.
"""

from __future__ import annotations

import argparse
import codecs
import math
import numbers
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from . import kernels
from .config import SettingError
from .data import EOT, get_tokenizer
from .model import COMPILE_NEEDS_KERNELS, DeepSeekV3
from .sampling import draw, probabilities, sample  # noqa: F401 (public here too: dsv3.generate.sample)
from .threads import fix as fix_threads
from .threads import governed
from .trace import Routes

CACHE_MODES = ("absorbed", "naive", "none")
MAX_DRAFTS = 8  # drafts per speculative round at most


@dataclass
class Generation:
    """One prompt's result. Token t of `tokens` was routed to `expert_ids[l, t]` with `gates[l, t]` in MoE layer l."""

    text: str  # the continuation: prompt excluded, cut before the first stop string, no <|endoftext|>
    tokens: list[int]  # prompt ids, then the generated ids (a final <|endoftext|> is not included)
    n_prompt: int  # how many of `tokens` are the prompt (an empty prompt is the one token <|endoftext|>)
    token_texts: list[str]  # per token, the text it completes ('' while a UTF-8 character is still partial)
    finish_reason: str  # "eot" (<|endoftext|>), "stop" (a stop string), "length" (max_new_tokens) or "cancelled"
    expert_ids: torch.Tensor | None = None  # (n_moe_layers, len(tokens), top-k) routed expert ids, int64
    gates: torch.Tensor | None = None  # (n_moe_layers, len(tokens), top-k) their gate weights g_i,t (fp32)
    # speculative=True: per generated token, the MTP draft proposed for its position (None: no draft, the main
    # model chose alone). The token equals its draft exactly when the draft was accepted.
    drafts: list[int | None] | None = None
    draft_depths: list[int | None] | None = None  # per generated token, the depth 1..D that drafted it (None: none)
    draft_vocab: int | None = None  # speculative=True: how many of the head's rows the draft scored

    @property
    def drafted(self) -> int:
        """Generated tokens that had a draft (0 without speculative decoding)."""
        return sum(d is not None for d in self.drafts or [])

    @property
    def accepted(self) -> int:
        """Drafts the main model accepted."""
        if not self.drafts:
            return 0
        return sum(d == t for d, t in zip(self.drafts, self.tokens[self.n_prompt:], strict=True) if d is not None)

    @property
    def acceptance_rate(self) -> float | None:
        """accepted / drafted (None when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else None

    def acceptance_by_depth(self) -> list[float | None]:
        """accepted / drafted for the drafts of depth 1, 2, .. D (None where a depth drafted nothing)."""
        if not self.drafts:
            return []
        pairs = list(zip(self.drafts, self.draft_depths, self.tokens[self.n_prompt:], strict=True))
        D = max((k for _, k, _ in pairs if k), default=0)
        rates = []
        for depth in range(1, D + 1):
            kept = [d == t for d, k, t in pairs if k == depth]
            rates.append(sum(kept) / len(kept) if kept else None)
        return rates

    def acceptance_text(self, digits: int = 1) -> str:
        """"accepted/drafted (rate)", with the rate of each depth when more than one drafted, as generate --speculative
        and the playground report it: "41/60 (68.3%; by depth 80.0% / 56.7%)" ("0/0" when nothing was drafted)."""
        if not self.drafted:
            return f"{self.accepted}/{self.drafted}"
        by = self.acceptance_by_depth()
        depths = " / ".join("-" if r is None else f"{r:.{digits}%}" for r in by)
        return (f"{self.accepted}/{self.drafted} ({self.acceptance_rate:.{digits}%}"
                f"{f'; by depth {depths}' if len(by) > 1 else ''})")

    def top_experts(self) -> torch.Tensor:
        """(n_moe_layers, len(tokens)): the expert with the largest gate weight for each token."""
        if self.gates.shape[-1] == 0:  # a dense model routes nothing
            return self.expert_ids.new_zeros(self.expert_ids.shape[:-1])
        return self.expert_ids.gather(-1, self.gates.argmax(-1, keepdim=True)).squeeze(-1)


# --- argument checks: every bad value is a ValueError naming the parameter and its allowed range ---

def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_sampling(model, temperature, top_k, top_p, cache, compile=False, speculative=False, draft_vocab=None,
                    n_drafts=None) -> None:
    if not isinstance(model, DeepSeekV3):
        raise ValueError(f"model must be a dsv3.DeepSeekV3, got {type(model).__name__}")
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool) or \
            not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    V = model.cfg.vocab_size
    if not _is_int(top_k) or not 0 <= top_k <= V:
        raise ValueError(f"top_k must be an int in [0, vocab_size={V}] (0 = off), got {top_k!r}")
    if not isinstance(top_p, numbers.Real) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {', '.join(map(repr, CACHE_MODES))}, got {cache!r}")
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got {compile!r}")
    if compile and (cache != "absorbed" or model.cfg.attn != "mla"):
        raise ValueError(f"compile=True needs an MLA model and cache='absorbed' (got attn={model.cfg.attn!r}, "
                         f"cache={cache!r})")
    if compile and not kernels.enabled():
        raise ValueError(COMPILE_NEEDS_KERNELS)
    if not isinstance(speculative, bool):
        raise ValueError(f"speculative must be True or False, got {speculative!r}")
    if draft_vocab is not None and (not _is_int(draft_vocab) or draft_vocab < 0):
        raise ValueError(f"draft_vocab must be an int >= 0 (the draft's vocabulary size, 0 = all {V} tokens) or "
                         f"None (the default), got {draft_vocab!r}")
    if n_drafts is not None and (not _is_int(n_drafts) or not 1 <= n_drafts <= MAX_DRAFTS):
        raise ValueError(f"n_drafts must be an int in [1, {MAX_DRAFTS}] or None (the model's n_mtp_layers), "
                         f"got {n_drafts!r}")
    if speculative:
        if model.cfg.n_mtp_layers == 0:
            raise ValueError("speculative=True drafts with the model's multi-token prediction modules, and this "
                             "model has none (n_mtp_layers=0): train one with --mtp-layers 1, or decode without "
                             "speculative")
        if cache == "none":
            raise ValueError("speculative=True needs a cache to roll back (cache='absorbed' or 'naive', "
                             "got cache='none')")


def _check_length(model, prompt_len: int, max_new_tokens) -> None:
    L = model.cfg.max_seq_len
    if prompt_len > L:
        raise ValueError(f"prompt is {prompt_len} tokens; it must be at most max_seq_len={L} "
                         "(prompts are never truncated)")
    if not _is_int(max_new_tokens) or not 0 <= max_new_tokens <= L - prompt_len:
        raise ValueError(f"max_new_tokens must be an int in [0, max_seq_len - prompt tokens = {L} - {prompt_len} "
                         f"= {L - prompt_len}], got {max_new_tokens!r}")


def _generator(seed, device: torch.device) -> torch.Generator | None:
    if seed is None:  # fresh entropy, still without touching the global RNG
        g = torch.Generator(device=device)
        g.seed()
        return g
    if isinstance(seed, torch.Generator):
        return seed
    if _is_int(seed) and seed >= 0:
        return torch.Generator(device=device).manual_seed(int(seed))
    raise ValueError(f"seed must be None, an int >= 0 or a torch.Generator, got {seed!r}")


# --- token level ---

def generate_tokens(model: DeepSeekV3, tokens: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, seed=None, cache: str = "absorbed",
                    key_mask: torch.Tensor | None = None, trace: list | None = None,
                    compile: bool = False, speculative: bool = False, draft_vocab: int | None = None,
                    n_drafts: int | None = None, drafts: list | None = None,
                    draft_depths: list | None = None) -> Iterator[torch.Tensor]:
    """Yield the next id of every row, a (B,) tensor, up to max_new_tokens times. Stop early by breaking.

    tokens (B, P) are the prompts, left-padded; key_mask (B, P) marks the real tokens (False = padding).
    The prompt goes through the model in one forward; each yielded token is fed back (one forward of
    one position against the cache) when the next one is requested. With `trace` (a list), every
    forward appends (expert_ids, gates), each (n_moe_layers, B, positions, top-k); after the last
    token, one more forward routes it, so the trace covers all P + max_new_tokens positions.
    The model is put in eval mode for the loop and restored afterwards. compile=True runs the one-position
    steps through `DeepSeekV3.decode_step(compiled=True)` (torch.compile; the first call compiles for a while).
    speculative=True drafts with the model's MTP modules and verifies the drafts in one forward (speculative.py):
    greedy ids are identical to plain decoding's, sampled ids follow the same distribution; with compile=True the
    verifying and drafting steps run compiled. draft_vocab: the draft scores the K most frequent tokens only
    (None: speculative.DRAFT_VOCAB, 0: the whole vocabulary); n_drafts: drafts per round (None: the model's
    n_mtp_layers; more than it reuses the last module). `drafts` (a list) then receives, per yielded step, the
    (B,) ids of the drafts proposed for it (-1: none), and `draft_depths` (a list) the depth that drafted it (0).
    """
    _check_sampling(model, temperature, top_k, top_p, cache, compile, speculative, draft_vocab, n_drafts)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be a (batch, prompt_len >= 1) tensor, got {getattr(tokens, 'shape', tokens)}")
    _check_length(model, tokens.shape[1], max_new_tokens)
    if key_mask is not None and (key_mask.shape != tokens.shape or key_mask.dtype != torch.bool):
        raise ValueError(f"key_mask must be a bool tensor shaped like tokens {tuple(tokens.shape)}")
    gen = _generator(seed, model.embed.weight.device)  # checked even when greedy leaves it unused
    if speculative:
        from .speculative import DRAFT_VOCAB, speculative_loop

        seq, key_mask = _sequence(model, tokens, max_new_tokens, key_mask)
        return speculative_loop(model, seq, tokens.shape[1], key_mask, (temperature, top_k, top_p, gen), cache,
                                trace, drafts, draft_depths, compile,
                                DRAFT_VOCAB if draft_vocab is None else draft_vocab, n_drafts)
    return _loop(model, tokens, max_new_tokens, (temperature, top_k, top_p, gen), cache, key_mask, trace, compile)


def _sequence(model, tokens, max_new_tokens, key_mask):
    """The (B, P + max_new_tokens) buffer of token ids with the prompts in place, and the key mask extended over the
    new positions (None when nothing is padding): the decoding loops' shared start."""
    device = model.embed.weight.device
    B, P = tokens.shape
    seq = torch.full((B, P + max_new_tokens), EOT, dtype=torch.long, device=device)
    seq[:, :P] = tokens
    if key_mask is not None:
        key_mask = torch.cat([key_mask.to(device), key_mask.new_ones(B, max_new_tokens, device=device)], dim=1)
        if key_mask.all():
            key_mask = None
    return seq, key_mask


@torch.inference_mode()
def _loop(model, tokens, max_new_tokens, sampling, cache, key_mask, trace, compile):
    device = model.embed.weight.device
    B, P = tokens.shape
    N = P + max_new_tokens
    seq, key_mask = _sequence(model, tokens, max_new_tokens, key_mask)
    kv = None
    if cache != "none":  # bf16 on CUDA halves the cache; the reads cast back to the compute dtype
        kv = model.new_cache(B, N, absorb=cache == "absorbed",
                             dtype=torch.bfloat16 if device.type == "cuda" else None)
        kv.key_mask = key_mask
    moes = model.moe_layers()

    def forward(start: int, end: int) -> torch.Tensor:
        """Run positions [start, end); return the logits (B, V) of the last one."""
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if compile and end - start == 1:
                logits = model.decode_step(seq[:, start:end], kv, compiled=True)
            elif kv is not None:
                logits = model(seq[:, start:end], cache=kv, last_logits=True).logits[:, -1]
            elif key_mask is None:
                logits = model(seq[:, :end], last_logits=True).logits[:, -1]
            else:  # no cache to reuse, but left padding needs a mask: a throwaway cache carries it
                once = model.new_cache(B, end, absorb=False)
                once.key_mask = key_mask[:, :end]
                logits = model(seq[:, :end], cache=once, last_logits=True).logits[:, -1]
        if routes:  # without a cache the MoE saw all `end` positions; keep the new ones
            trace.append(Routes.stack(routes, slice(start - end, None)))
        return logits.float()

    was_training = model.training
    model.eval()  # training mode would count routed slots into the gates' step_load
    routes = Routes.attach(moes, B) if trace is not None else []
    try:
        with governed(device, compile) as tick:  # fewer threads while another job shares the CPU (threads.py)
            logits = forward(0, P)
            for n in range(P, N):
                seq[:, n] = sample(logits, *sampling)
                yield seq[:, n]
                if n + 1 < N or trace is not None:
                    logits = forward(n, n + 1)
                    tick()
    finally:
        model.train(was_training)
        Routes.detach(moes, routes)


# --- text level ---

@dataclass
class _Row:
    """One prompt's text state: UTF-8 held back until complete, stop strings, finish reason."""

    prompt: list[int]
    stop: tuple[str, ...]
    new: list[int] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    enc: object = None  # the tokenizer (`_text_codec`); None = GPT-2's
    eot: int = EOT  # the id that ends the text

    def __post_init__(self):
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # keeps a partial character
        self.enc = self.enc or get_tokenizer()
        self.token_texts = [self.utf8.decode(self.enc.decode_single_token_bytes(t)) for t in self.prompt]

    def add(self, token: int) -> None:
        if token == self.eot:
            return self.end("eot")
        self.new.append(token)
        piece = self.utf8.decode(self.enc.decode_single_token_bytes(token))
        self.token_texts.append(piece)
        self.text += piece
        self._cut()

    def end(self, reason: str) -> None:
        tail = self.utf8.decode(b"", final=True)  # an unfinished character becomes U+FFFD, as in decode()
        if tail:
            self.token_texts[-1] += tail
            self.text += tail
        self.finish = reason
        self._cut()

    def _cut(self) -> None:
        hits = [i for s in self.stop if (i := self.text.find(s)) >= 0]
        if hits:
            self.text, self.finish = self.text[:min(hits)], "stop"

    def ready(self) -> str:
        """The text that can be shown: all of it once finished, else minus a tail that may begin a stop string."""
        if self.finish:
            return self.text
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self.text[:len(self.text) - hold]


def _text_codec(model):
    """The tokenizer, the end-of-text id and the id every prompt starts with (None: none) of `model`: GPT-2's
    r50k_base and <|endoftext|> for dsv3's own models, an imported checkpoint's tokenizer.json (`dsv3.from_hf` sets
    model.tokenizer) otherwise."""
    if not hasattr(model, "tokenizer"):
        return get_tokenizer(), EOT, None
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer (its folder had no tokenizer.json): give token ids to "
                         "dsv3.generate_tokens instead")
    tok = model.tokenizer
    return tok, tok.eot, tok.bos


def _prepare(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, cache, trace, compile,
             speculative=False, drafts=None, draft=(None, None, None)):
    """Check everything, tokenize and left-pad; return the rows and the token iterator. draft: (draft_vocab,
    n_drafts, the list for the drafts' depths)."""
    _check_sampling(model, temperature, top_k, top_p, cache, compile, speculative, *draft[:2])
    if isinstance(stop, str):
        stop = (stop,)
    if stop is None:
        stop = ()
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    enc, eot, bos = _text_codec(model)
    start = [] if bos is None else [bos]
    pad = eot if eot is not None else 0
    ids = [start + enc.encode_ordinary(p) or [pad] for p in prompts]  # an empty prompt starts from <|endoftext|>
    P = max(map(len, ids))
    _check_length(model, P, max_new_tokens)
    tokens = torch.full((len(ids), P), pad, dtype=torch.long)
    key_mask = torch.zeros(len(ids), P, dtype=torch.bool)
    for i, row in enumerate(ids):  # left padding: every prompt ends at position P - 1
        tokens[i, P - len(row):] = torch.tensor(row)
        key_mask[i, P - len(row):] = True
    steps = generate_tokens(model, tokens, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, cache=cache, key_mask=key_mask, trace=trace, compile=compile,
                            speculative=speculative, draft_vocab=draft[0], n_drafts=draft[1], drafts=drafts,
                            draft_depths=draft[2])
    return [_Row(row, tuple(stop), enc=enc, eot=eot) for row in ids], steps


def _drive(rows: list[_Row], steps, max_new_tokens: int) -> Iterator[list[_Row]]:
    """Feed each step's ids to the rows; yield after each step; finish at max_new_tokens or when all rows end."""
    if max_new_tokens == 0:
        for r in rows:
            r.end("length")
    for n, nxt in enumerate(steps, start=1):
        for r, t in zip(rows, nxt.tolist(), strict=True):
            if r.finish is None:
                r.add(t)
                if r.finish is None and n == max_new_tokens:
                    r.end("length")
        if all(r.finish for r in rows):
            break
        yield rows
    yield rows


def generate(model: DeepSeekV3, prompt: str | list[str], max_new_tokens: int = 200, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | torch.Generator | None = None,
             stop: str | list[str] | None = None, cache: str = "absorbed", return_trace: bool = False,
             on_text=None, compile: bool = False, cancel=None, speculative: bool = False,
             draft_vocab: int | None = None, n_drafts: int | None = None):
    """Continue `prompt` (a string, or a list of strings generated together as one left-padded batch).

    Stops at <|endoftext|>, at the first of the `stop` strings (cut from the text) or after
    max_new_tokens. temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off; `seed`
    (an int or a torch.Generator) makes sampling reproducible. `cache` is "absorbed", "naive" or "none";
    compile=True compiles the decoding step (absorbed cache only, see the module docstring).
    Returns the continuation without the prompt (list in, list out); with return_trace=True a
    `Generation` per prompt, holding the token ids, per-token texts and the routing of every token.
    `on_text`, if given, is called after every decoded token with the text so far (a list for a list of
    prompts): the same UTF-8-complete, stop-aware text that `stream` yields, for UIs that also want the trace.
    `cancel`, if given, is a callable checked after every decoded token: once it returns True the generation
    ends there (finish_reason "cancelled") and returns what it has, trace included (a UI's Stop button).
    speculative=True decodes with the model's multi-token prediction modules as the draft (speculative.py; the
    model needs n_mtp_layers >= 1): the same greedy text, the same sampling distribution, fewer main-model
    forwards; `Generation.drafts` / `.acceptance_rate` / `.acceptance_by_depth()` then tell which drafts were
    kept, and `.draft_vocab` how many tokens the draft scored. draft_vocab: the draft scores only the K most
    frequent tokens (None: speculative.DRAFT_VOCAB; 0: all); n_drafts: drafts per round (None: n_mtp_layers).
    """
    batch = not isinstance(prompt, str)
    prompts = list(prompt) if batch and isinstance(prompt, (list, tuple)) else [prompt]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    chunks = [] if return_trace else None
    drafts = [] if return_trace and speculative else None
    depths = [] if return_trace and speculative else None
    rows, steps = _prepare(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, cache, chunks,
                           compile, speculative, drafts, (draft_vocab, n_drafts, depths))
    for _ in _drive(rows, steps, max_new_tokens):
        if on_text is not None:
            on_text([r.ready() for r in rows] if batch else rows[0].ready())
        if cancel is not None and cancel():
            for r in rows:
                if r.finish is None:
                    r.end("cancelled")
            break
    if return_trace:
        next(steps, None)  # route the last sampled tokens too (a no-op if the loop ran to max_new_tokens)
        steps.close()
    else:
        steps.close()
        out = [r.text for r in rows]
        return out if batch else out[0]
    K = None
    if speculative:
        from .speculative import DRAFT_VOCAB, draft_rows

        K = draft_rows(model, DRAFT_VOCAB if draft_vocab is None else draft_vocab)
    results = _generations(model, rows, chunks, drafts, depths, K)
    return results if batch else results[0]


def _generations(model, rows, chunks, drafts, depths, K) -> list[Generation]:
    """One `Generation` per row from the loop's routing chunks and, with speculation, its drafts and their depths."""
    L = len(model.moe_layers())
    ids = torch.cat([c[0] for c in chunks], dim=2).cpu() if chunks else None
    gates = torch.cat([c[1] for c in chunks], dim=2).cpu() if chunks else None
    P = max(len(r.prompt) for r in rows)
    results = []
    for i, r in enumerate(rows):
        tokens = r.prompt + r.new
        span = slice(P - len(r.prompt), P - len(r.prompt) + len(tokens))
        empty = torch.zeros(L, len(tokens), 0)
        proposed = None if drafts is None else [int(d[i]) if d[i] >= 0 else None for d in drafts[:len(r.new)]]
        by = None if depths is None else [k or None for k in depths[:len(r.new)]]
        results.append(Generation(r.text, tokens, len(r.prompt), r.token_texts, r.finish,
                                  ids[:, i, span] if ids is not None else empty.long(),
                                  gates[:, i, span] if gates is not None else empty, proposed, by, K))
    return results


def stream(model: DeepSeekV3, prompt: str, max_new_tokens: int = 200, *, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, seed: int | torch.Generator | None = None, stop: str | list[str] | None = None,
           cache: str = "absorbed", compile: bool = False, speculative: bool = False, draft_vocab: int | None = None,
           n_drafts: int | None = None) -> Iterator[str]:
    """Like `generate` for one prompt, but yield the continuation piece by piece as it is decoded.

    A piece is yielded as soon as it is valid UTF-8 (a character split across tokens waits for its last
    byte) and cannot be the start of a stop string; the pieces concatenate to `generate`'s text.
    Arguments are checked here, before the first piece is requested.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string (stream takes one prompt), got {type(prompt).__name__}")
    rows, steps = _prepare(model, [prompt], max_new_tokens, temperature, top_k, top_p, seed, stop, cache, None,
                           compile, speculative, None, (draft_vocab, n_drafts, None))

    def pieces() -> Iterator[str]:
        shown = 0
        try:
            for (row,) in _drive(rows, steps, max_new_tokens):
                text = row.ready()
                if len(text) > shown:
                    yield text[shown:]
                    shown = len(text)
        finally:
            steps.close()

    return pieces()


# --- command line: python -m dsv3 generate ---

def add_cli_args(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint folder (step_*) or a run folder (its newest)")
    src.add_argument("--hf", metavar="PATH", help="a transformers model folder (DeepSeek-V2/V3, Llama; dsv3.from_hf)")
    p.add_argument("--best", action="store_true",
                   help="with --checkpoint: the run's best checkpoint (lowest validation loss, RUN/best), not its "
                   "newest")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="with --hf: the weights' dtype (default: the folder's own)")
    p.add_argument("--prompt", default="", help="text to continue (default: empty = start from <|endoftext|>)")
    p.add_argument("--prompt-ids", default=None, metavar="IDS",
                   help="token ids to continue, comma- or space-separated (instead of --prompt); prints the "
                        "generated ids, all --max-new-tokens of them (no tokenizer needed) (default: none)")
    p.add_argument("--max-new-tokens", type=_max_new_tokens, default=None, metavar="N",
                   help="tokens to generate at most (default: fill, up to the end of the model's context: "
                        "max_seq_len - prompt tokens)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible (default: a random seed)")
    p.add_argument("--stop", action="append", default=None,
                   help="stop before this string (repeatable) (default: only at <|endoftext|>)")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, mps, ... (default: auto = cuda, else mps, else cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's; 1 is faster on a busy machine)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--naive-cache", dest="cache", action="store_const", const="naive", default="absorbed",
                      help="up-project the cached latent every step instead of the absorbed path")
    mode.add_argument("--no-cache", dest="cache", action="store_const", const="none",
                      help="recompute the whole sequence every step")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding step (absorbed cache; faster per token after a compile)")
    p.add_argument("--speculative", action="store_true",
                   help="draft with the checkpoint's multi-token prediction modules and verify the drafts in one "
                        "forward (needs a model trained with --mtp-layers; same greedy text)")
    p.add_argument("--draft-vocab", type=int, default=None, metavar="K",
                   help="with --speculative: the draft scores the K most frequent tokens only, 0 = all "
                        "(default: dsv3.speculative.DRAFT_VOCAB)")
    p.add_argument("--drafts", type=int, default=None, metavar="D",
                   help="with --speculative: drafts per round (default: the model's MTP depths)")
    p.add_argument("--no-kernels", action="store_true", help="run the plain reference model (dsv3.kernels off)")


def _max_new_tokens(text: str) -> int | None:
    """--max-new-tokens: an int, or "fill" (None: up to the end of the context)."""
    if text == "fill":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int or 'fill', got {text!r}") from None


def _flagged(e: ValueError) -> str:
    """The message with the parameter it starts with named as its flag: "--top-p must be in (0, 1] ..."."""
    flags = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "draft_vocab")
    msg = SettingError(str(e)).named(lambda n: "--drafts" if n == "n_drafts" else
                                     f"--{n.replace('_', '-')}" if n in flags else None)
    if msg.startswith("--max-new-tokens must"):
        msg += " (leave --max-new-tokens out to fill the context)"
    return msg


def _load_cli_model(args, device: str) -> DeepSeekV3:
    """The model of --checkpoint or --hf; every failure is one ValueError / FileNotFoundError naming the flag."""
    from .checkpoint import load_checkpoint

    flag, source = ("--hf", args.hf) if args.hf is not None else ("--checkpoint", args.checkpoint)
    try:
        if args.hf is not None:
            from .hf import from_hf

            return from_hf(args.hf, dtype=args.dtype, device=device)
        return load_checkpoint(args.checkpoint, map_location=device, best=getattr(args, "best", False))
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{flag}: {' '.join(str(e).split())}") from None
    except Exception as e:  # unreadable in some other way: still one line, never a stack trace
        raise ValueError(f"{flag} {source}: could not load it ({type(e).__name__}: "
                         f"{' '.join(str(e).split())})") from None


def _prompt_ids(args, model) -> list[int]:
    """The prompt's token ids: --prompt-ids as given, else --prompt through the model's tokenizer (as `generate`
    tokenizes it: its bos id first, an empty prompt is <|endoftext|>)."""
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"--prompt-ids must be integers separated by commas or spaces, got {args.prompt_ids!r}") \
                from None
        if not ids:
            raise ValueError("--prompt-ids is empty")
        return ids
    if getattr(model, "tokenizer", True) is None:
        raise ValueError(f"--hf {args.hf} has no tokenizer.json, so --prompt cannot be tokenized: give token ids "
                         "with --prompt-ids (e.g. --prompt-ids 1,450,3681)")
    enc, eot, bos = _text_codec(model)
    return ([] if bos is None else [bos]) + enc.encode_ordinary(args.prompt) or [eot if eot is not None else 0]


def _report(args, model, n_new: int, seconds: float, finish: str, g: Generation | None = None) -> str:
    """generate's line on stderr: tokens, tokens/s (prefill included, as the playground counts), why it stopped,
    and with --speculative (g: the run's Generation) the drafts accepted, in all and per depth when more than one
    drafted, and the draft vocabulary (how many of the head's rows it scored)."""
    rate = f"{n_new / seconds:.1f}" if seconds > 0 else "-"
    line = f"{n_new} token{'s' * (n_new != 1)} in {seconds:.2f} s, {rate} tokens/s"
    if finish == "length":
        line += (f"; stopped at the end of the context (max_seq_len {model.cfg.max_seq_len} tokens)"
                 if args.max_new_tokens is None
                 else f"; stopped at --max-new-tokens {args.max_new_tokens}")
    elif finish in ("eot", "stop"):
        line += "; stopped at <|endoftext|>" if finish == "eot" else "; stopped at a --stop string"
    if args.speculative:
        line += f"; drafts accepted {g.acceptance_text()}"
        from .speculative import DRAFT_VOCAB, draft_rows

        K = draft_rows(model, DRAFT_VOCAB if args.draft_vocab is None else args.draft_vocab)
        line += f", draft vocabulary {K:,} of {model.cfg.vocab_size:,} tokens"
    return line


def _run_ids(args, model, ids: list[int], max_new: int) -> tuple[int, Generation | None]:
    """--prompt-ids: print the generated ids; return how many, and with --speculative a Generation of the ids and
    their drafts for the report (no texts: token ids in, token ids out)."""
    device = model.embed.weight.device
    drafts, depths = ([], []) if args.speculative else (None, None)
    try:
        steps = generate_tokens(model, torch.tensor([ids], device=device), max_new, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed, cache=args.cache,
                                compile=args.compile, speculative=args.speculative, draft_vocab=args.draft_vocab,
                                n_drafts=args.drafts, drafts=drafts, draft_depths=depths)
    except ValueError as e:
        raise ValueError(_flagged(e)) from None
    out = [int(t) for t in steps]
    print(" ".join(map(str, out)))
    if drafts is None:
        return len(out), None
    proposed = [int(d[0]) if d[0] >= 0 else None for d in drafts]
    return len(out), Generation("", ids + out, len(ids), [], "length", drafts=proposed,
                                draft_depths=[k or None for k in depths])


def _run_text(args, model, max_new: int):
    """--prompt: print the prompt and its continuation (with --stream piece by piece, each once it is valid UTF-8
    and cannot begin a --stop string); return the Generation."""
    shown = None  # with --stream: how much of the continuation is printed (None: not even the prompt yet)

    def on_text(text: str) -> None:
        nonlocal shown
        sys.stdout.write(text[shown:] if shown is not None else args.prompt + text)
        sys.stdout.flush()
        shown = len(text)

    try:  # every argument is checked before the first piece is printed
        g = generate(model, args.prompt, max_new, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                     seed=args.seed, stop=args.stop, cache=args.cache, compile=args.compile, return_trace=True,
                     speculative=args.speculative, draft_vocab=args.draft_vocab, n_drafts=args.drafts,
                     on_text=on_text if args.stream else None)
    except ValueError as e:
        raise ValueError(_flagged(e)) from None
    print(g.text[shown:] if shown is not None else args.prompt + g.text)
    return g


def cmd_generate(args) -> int:
    from .devices import resolve_device

    device = resolve_device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        fix_threads(args.threads)  # the user's choice: not governed
    if args.dtype is not None and args.hf is None:
        raise ValueError("--dtype goes with --hf (it sets the dtype of the imported weights)")
    model = _load_cli_model(args, device)
    if args.speculative and not model.cfg.n_mtp_layers:
        raise ValueError("--speculative drafts with the model's multi-token prediction modules, and this model has "
                         "none (n_mtp_layers=0): train one with --mtp-layers 1, or leave --speculative out")
    ids = _prompt_ids(args, model)
    # "fill" (the default): up to the end of the context; a prompt that is already too long is refused below
    max_new = args.max_new_tokens if args.max_new_tokens is not None else max(0, model.cfg.max_seq_len - len(ids))
    start = time.perf_counter()
    if args.prompt_ids is not None:
        (n_new, g), finish = _run_ids(args, model, ids, max_new), "length"
    else:
        g = _run_text(args, model, max_new)
        n_new, finish = len(g.tokens) - g.n_prompt, g.finish_reason
    print(_report(args, model, n_new, time.perf_counter() - start, finish, g), file=sys.stderr)
    return 0
