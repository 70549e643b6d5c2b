"""Tokenizer and corpus: the GPT-2 BPE (tiktoken r50k_base), Tiny Shakespeare, the split, the sampler.

- `get_tokenizer()`: the r50k_base encoding (50,257 tokens, <|endoftext|> = 50256).
- `MissingFile`: a file dsv3 needs (the tokenizer's BPE file, the corpus) is neither on disk nor downloadable; one
  line saying what and how to fix it (the CLI prints it and exits 2; Jupyter shows it without a traceback), and
  `check_setup()` raises it up front (the notebooks' first cell).
- `corpus_path()` / `download_tiny_shakespeare()`: a local text file (argument, else $DSV3_CORPUS), else
  Tiny Shakespeare downloaded once into the cache folder ($DSV3_DATA_DIR, default ~/.cache/dsv3) and
  checked against its sha256.
- `load_tokens()`: any UTF-8 text file -> token ids (uint16), cached in the cache folder (keyed by the
  text's sha256) so the second run does not re-tokenize.
- `split_tokens()`: the last `val_fraction` of the tokens is held out for validation; training never sees it.
- `BatchSampler`: seeded random windows of seq_len + 1 tokens, shifted once into inputs and targets.
  Global batch i depends only on (seed, i), so its state is one counter, and rank r of world w takes
  rows r::w of the same global batch (data parallel without changing results for w = 1).
Does not know about models or training.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import tempfile
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import torch

TOKENIZER_NAME = "r50k_base"  # the GPT-2 vocabulary: 50,257 tokens
EOT = 50256  # <|endoftext|>
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TOKENIZER_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"  # where tiktoken gets it


class MissingFile(FileNotFoundError):
    """A file dsv3 needs is neither on disk nor downloadable. The message is one line: what is missing and the fix."""

    def _render_traceback_(self) -> list[str]:  # IPython/Jupyter show this instead of a traceback
        return [f"{type(self).__name__}: {self}"]


@functools.cache
def get_tokenizer(name: str = TOKENIZER_NAME):
    """The tiktoken encoding. tiktoken downloads its BPE file once into $TIKTOKEN_CACHE_DIR (default: the temp
    folder's data-gym-cache/) under the SHA-1 of its URL; offline, without that file, this raises `MissingFile`."""
    import tiktoken

    try:
        return tiktoken.get_encoding(name)
    except OSError as e:  # requests' errors are OSErrors: no network, a proxy refusing, a DNS failure
        if name != TOKENIZER_NAME:
            raise
        folder = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
            os.path.join(tempfile.gettempdir(), "data-gym-cache")
        key = hashlib.sha1(TOKENIZER_URL.encode()).hexdigest()
        raise MissingFile(
            f"the GPT-2 tokenizer file (tiktoken {name}) is not in {folder} and could not be downloaded "
            f"({type(e).__name__}); fix: connect to the internet once (tiktoken caches it), or set "
            f"TIKTOKEN_CACHE_DIR to a folder holding {TOKENIZER_URL} saved under the name {key} (its URL's SHA-1)"
        ) from None


def check_setup(corpus: bool = True) -> None:
    """Raise `MissingFile` (one line) now if the tokenizer, or with corpus=True the training text, is missing and
    cannot be downloaded: the notebooks call it first, so an offline machine is told before any work starts."""
    get_tokenizer()
    if corpus:
        read_corpus(corpus_path())


# --- corpus ---
def cache_dir() -> Path:
    """Where downloads and token caches go: $DSV3_DATA_DIR, default ~/.cache/dsv3."""
    return Path(os.environ.get("DSV3_DATA_DIR") or "~/.cache/dsv3").expanduser()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write beside `path`, then rename: readers see the old file or the whole new one. open() (not mkstemp, which
    makes 0600) gives the file the user's umask mode."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def download_tiny_shakespeare(url: str = TINY_SHAKESPEARE_URL) -> Path:
    """Tiny Shakespeare in the cache folder, downloaded once and verified by sha256."""
    path = cache_dir() / "tinyshakespeare.txt"
    if path.exists() and _sha256(path) == TINY_SHAKESPEARE_SHA256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read()
    except OSError as e:
        reason = getattr(e, "reason", None) or e  # urllib's URLError wraps the socket error
        raise MissingFile(
            f"the corpus (Tiny Shakespeare) is not in {path.parent} and could not be downloaded from {url} "
            f"({' '.join(str(reason).split())}); fix: connect to the internet once (it is saved there), or set "
            "DSV3_CORPUS (or pass --corpus) to a local UTF-8 text file, e.g. that URL's input.txt"
        ) from None
    got = hashlib.sha256(data).hexdigest()
    if got != TINY_SHAKESPEARE_SHA256:
        raise ValueError(f"downloaded {url} has sha256 {got}, expected {TINY_SHAKESPEARE_SHA256}; not saved")
    _atomic_write(path, data)
    return path


def corpus_path(path: str | os.PathLike | None = None) -> Path:
    """The corpus file: `path`, else $DSV3_CORPUS, else Tiny Shakespeare (downloaded when missing)."""
    path = path or os.environ.get("DSV3_CORPUS")
    return Path(path).expanduser() if path else download_tiny_shakespeare()


def read_corpus(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file; a missing, empty, binary or non-UTF-8 file raises an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"corpus file {path} does not exist (or is not a file)")
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"corpus file {path} is empty")
    if b"\x00" in data:
        raise ValueError(f"corpus file {path} looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus file {path} is not valid UTF-8 text ({e})") from e


def _token_cache_path(path: Path, digest: str) -> Path:
    # In the cache folder (beside the downloaded corpus), keyed by content: a user's own text folder
    # stays untouched, read-only corpus folders work, and an edited file never hits a stale cache.
    return cache_dir() / f"{path.stem}.{TOKENIZER_NAME}.{digest[:16]}.npy"


def load_tokens(path: str | os.PathLike | None = None) -> np.ndarray:
    """Token ids (uint16) of the corpus, cached in cache_dir() by content hash (see module doc)."""
    path = corpus_path(path)
    text = read_corpus(path)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    cache = _token_cache_path(path, digest)
    if cache.exists():
        try:
            return np.load(cache, allow_pickle=False)
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt below
    ids = np.asarray(get_tokenizer().encode_ordinary(text), dtype=np.uint16)  # vocab 50,257 < 2**16
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, ids)
        _atomic_write(cache, buf.getvalue())
    except OSError:
        pass  # caching is an optimisation; an unwritable cache only costs re-tokenizing
    return ids


def split_tokens(tokens: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): the last `val_fraction` of the tokens is the held-out validation split."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = int(len(tokens) * val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of seq_len + 1 tokens from `starts`, shifted once: inputs x = w[:-1], targets y = w[1:]."""
    w = torch.from_numpy(np.stack([tokens[s: s + seq_len + 1] for s in starts]).astype(np.int64))
    return w[:, :-1], w[:, 1:]


class BatchSampler:
    """Seeded random training windows; `state_dict()` is (seed, next batch index).

    Global batch i holds `batch_size` windows whose starts come from a generator seeded with
    (seed, i): resuming needs only the counter, and a data-parallel rank takes its rows r::world.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if len(tokens) < seq_len + 2:
            raise ValueError(f"the training split has {len(tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of world_size {world_size}")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.index = 0

    def starts(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, i])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.starts(self.index)[self.rank:: self.world_size]
        self.index += 1
        return windows(self.tokens, starts, self.seq_len)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.index = int(state["seed"]), int(state["index"])


def val_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None):
    """Non-overlapping validation windows in order (the same every time), `batch_size` rows at a time."""
    starts = np.arange(0, len(tokens) - seq_len, seq_len)
    if len(starts) == 0:
        raise ValueError(f"the validation split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    n = len(starts) if max_batches is None else min(len(starts), max_batches * batch_size)
    for i in range(0, n, batch_size):
        yield windows(tokens, starts[i: min(i + batch_size, n)], seq_len)


def token_counts(tokens: np.ndarray, vocab_size: int) -> dict:
    """How often each id occurs in `tokens` (the training split), as JSON for a checkpoint's meta.json: the ids that
    occur, ascending, and their counts. Speculative decoding drafts over the most frequent ones."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size)
    ids = np.flatnonzero(counts)
    return {"ids": ids.tolist(), "counts": counts[ids].tolist()}


def counts_tensor(counts: dict, vocab_size: int) -> torch.Tensor:
    """`token_counts`' JSON back as a (vocab_size,) tensor of counts."""
    out = torch.zeros(vocab_size, dtype=torch.float64)
    ids = torch.tensor(counts["ids"], dtype=torch.long)
    if len(ids) and not (0 <= int(ids.min()) and int(ids.max()) < vocab_size):
        raise ValueError(f"token_counts hold ids outside [0, vocab_size={vocab_size})")
    return out.index_put_((ids,), torch.tensor(counts["counts"], dtype=torch.float64))
