"""Tokenizer and corpus: the GPT-2 BPE (tiktoken r50k_base) behind one function.

Does not know about models or training.
"""

from __future__ import annotations

import functools
import os

TOKENIZER_NAME = "r50k_base"  # the GPT-2 vocabulary: 50,257 tokens
EOT = 50256  # <|endoftext|>


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str = TOKENIZER_NAME):
    """The tiktoken encoding; offline it needs TIKTOKEN_CACHE_DIR pointing at a folder holding the BPE file."""
    import tiktoken

    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # tiktoken raises requests/IO errors when the download fails
        raise RuntimeError(
            f"could not load the {name!r} tokenizer ({type(e).__name__}: {e}). Without internet, set "
            "TIKTOKEN_CACHE_DIR to a folder that holds tiktoken's cached BPE file for it "
            f"(currently TIKTOKEN_CACHE_DIR={os.environ.get('TIKTOKEN_CACHE_DIR')!r})."
        ) from e
