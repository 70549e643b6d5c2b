"""`KVCache`: what decoding keeps per layer, where the next token goes, and which keys each query may see.

For MLA only the latent is cached: c_kv (kv_lora_rank values, DeepSeek-V2 eq. 9) and the shared RoPE key
k_pe (qk_rope_head_dim values, eq. 15) per token per layer; for the GQA baseline, every KV head's k and v.
The cache is preallocated for the whole generation; `pos` counts the positions written so far, and
`key_mask` (B, max_len), when set, marks real tokens (False = left padding that no query may attend to).
`Slots` is one layer of it as the static decoding step sees it (positions given as a tensor, every slot visible
to the mask), so that one compiled graph serves every position.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    """Preallocated per-layer decoding cache: MLA's (c_kv, k_pe) of shapes (n_layers, B, max_len, ·), or
    GQA's (k, v) of shapes (n_layers, B, n_kv_heads, max_len, head_dim). `absorb` picks MLA's decode path."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, *, absorb: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        if not 1 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"cache length must be in [1, max_seq_len={cfg.max_seq_len}], got {max_len}")
        if batch < 1:
            raise ValueError(f"cache batch must be >= 1, got {batch}")
        self.cfg, self.batch, self.max_len, self.absorb = cfg, batch, max_len, absorb
        self.pos = 0
        self.key_mask: torch.Tensor | None = None
        L = cfg.n_layers
        if cfg.attn == "mla":
            self.c_kv = torch.zeros(L, batch, max_len, cfg.kv_lora_rank, device=device, dtype=dtype)
            self.k_pe = torch.zeros(L, batch, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype)
            self.tensors = (self.c_kv, self.k_pe)
        else:
            shape = (L, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
            self.k = torch.zeros(shape, device=device, dtype=dtype)
            self.v = torch.zeros(shape, device=device, dtype=dtype)
            self.tensors = (self.k, self.v)

    def bytes_per_token(self) -> int:
        """Bytes one cached token occupies, summed over layers (measured from the tensors)."""
        return sum(t.numel() * t.element_size() for t in self.tensors) // (self.batch * self.max_len)

    def update(self, layer: int, *new: torch.Tensor, seq_dim: int = 1) -> tuple[torch.Tensor, ...]:
        """Write this layer's new entries (one tensor per cached kind, T positions along `seq_dim`) at `pos`;
        return every entry cached so far, positions 0 .. pos + T, in the dtype of the new entries."""
        s, T = self.pos, new[0].shape[seq_dim]
        out = []
        for store, t in zip(self.tensors, new, strict=True):
            store[layer].narrow(seq_dim, s, T).copy_(t)
            out.append(store[layer].narrow(seq_dim, 0, s + T).to(t.dtype))
        return tuple(out)

    def slots(self, layer: int, pos: torch.Tensor) -> Slots:
        """Layer `layer` as the static decoding step writes it: T new entries at positions `pos` (T,)."""
        return Slots(tuple(t[layer] for t in self.tensors), pos, self.absorb)

    def mask(self, T: int, whole_cache: bool = False) -> torch.Tensor | None:
        """Boolean (B|1, 1, T, S) attention mask for T new positions against S = pos + T keys (True = may attend);
        None for a plain causal prefill (nothing cached yet, no padding). whole_cache=True: against all
        S = max_len slots (the static shapes of a compiled decoding step)."""
        start = self.pos
        if start == 0 and self.key_mask is None and not whole_cache:
            return None
        dev = self.tensors[0].device
        S = self.max_len if whole_cache else start + T
        q_pos = torch.arange(start, start + T, device=dev)
        k_pos = torch.arange(S, device=dev)
        mask = k_pos[None, :] <= q_pos[:, None]  # (T, S) causal
        if self.key_mask is not None:  # never attend to padding, but let every query see itself
            mask = (mask & self.key_mask[:, None, :S]) | (k_pos[None, :] == q_pos[:, None])
            return mask[:, None]
        return mask[None, None]


class Slots:
    """One layer of a preallocated KVCache for T new positions per row given as a tensor `pos` (T,): the new
    entries are written there with index_copy_, and attention sees all max_len slots under the step's mask
    (`KVCache.mask(T, whole_cache=True)`). No Python int changes from step to step, so a compiled step keeps
    one graph. Block.forward takes it where it takes a KVCache (`absorb`, `update`)."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], pos: torch.Tensor, absorb: bool = True):
        self.tensors, self.pos, self.absorb = tensors, pos, absorb

    def update(self, layer: int, *new: torch.Tensor, seq_dim: int = 1) -> tuple[torch.Tensor, ...]:
        """Write the new entries at `pos`; return every slot, in the new entries' dtype (the mask hides the slots
        not written yet, or written by rejected drafts). `layer` is unused: a Slots is one layer already."""
        for store, t in zip(self.tensors, new, strict=True):
            store.index_copy_(seq_dim, self.pos, t.to(store.dtype))
        return tuple(store.to(t.dtype) for store, t in zip(self.tensors, new, strict=True))
