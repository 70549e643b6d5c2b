"""Tokenizer, corpus loading and its errors, the download check, the split, the sampler and its one shift."""

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv3 import data

CORPUS = os.environ.get("DSV3_CORPUS")
needs_corpus = pytest.mark.skipif(not CORPUS or not Path(CORPUS).is_file(), reason="DSV3_CORPUS not available")


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV3_DATA_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tokenizer_is_gpt2_bpe():
    enc = data.get_tokenizer()
    assert enc.n_vocab == 50257 and enc.eot_token == data.EOT == 50256
    text = "ROMEO:\nBut, soft! what light through yonder window breaks?"
    assert enc.decode(enc.encode_ordinary(text)) == text


@needs_corpus
def test_tiny_shakespeare_tokens_are_cached(data_dir, monkeypatch):
    ids = data.load_tokens()  # from $DSV3_CORPUS
    assert ids.dtype == np.uint16 and len(ids) == 338_025
    assert data.get_tokenizer().decode(ids[:3].tolist()) == "First Citizen:"
    cached = list(data_dir.glob("*.npy"))
    assert len(cached) == 1
    # the second load reads the cache: it works even with a tokenizer that would fail
    monkeypatch.setattr(data, "get_tokenizer", lambda *a: (_ for _ in ()).throw(AssertionError("re-tokenized")))
    assert np.array_equal(data.load_tokens(CORPUS), ids)


def test_any_utf8_file_is_a_corpus(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("Grüße aus Köln — naïve café ✓\n" * 3, encoding="utf-8")
    ids = data.load_tokens(f)
    assert data.get_tokenizer().decode(ids.tolist()) == f.read_text(encoding="utf-8")
    # an edited file is re-tokenized, not served from a stale cache
    f.write_text("something else entirely", encoding="utf-8")
    assert data.get_tokenizer().decode(data.load_tokens(f).tolist()) == "something else entirely"


@pytest.mark.parametrize("content, exc, words", [
    (None, FileNotFoundError, "does not exist"),
    (b"", ValueError, "empty"),
    (b" \n\t\n", ValueError, "empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ValueError, "binary"),
    ("caf\u00e9".encode("latin-1") + b" au lait", ValueError, "UTF-8"),
])
def test_bad_corpus_errors_name_the_file(tmp_path, content, exc, words):
    f = tmp_path / "corpus.bin"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(exc, match=words) as e:
        data.load_tokens(f)
    assert str(f) in str(e.value)


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


@needs_corpus
def test_download_verifies_sha256(monkeypatch, data_dir):
    monkeypatch.delenv("DSV3_CORPUS")
    good = Path(CORPUS).read_bytes()
    assert hashlib.sha256(good).hexdigest() == data.TINY_SHAKESPEARE_SHA256
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: _Response(good[:-1] + b"?"))
    with pytest.raises(ValueError, match="sha256"):
        data.corpus_path()
    assert not (data_dir / "tinyshakespeare.txt").exists()
    urls = []
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: urls.append(url) or _Response(good))
    path = data.corpus_path()
    assert path == data_dir / "tinyshakespeare.txt" and path.read_bytes() == good
    assert data.corpus_path() == path and urls == [data.TINY_SHAKESPEARE_URL]  # downloaded once

    def offline(url, timeout):
        raise OSError("no network")

    path.unlink()
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match="DSV3_CORPUS"):
        data.corpus_path()


def test_split_holds_out_the_tail():
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = data.split_tokens(tokens, 0.1)
    assert len(train) == 900 and len(val) == 100
    assert np.array_equal(np.concatenate([train, val]), tokens)
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_tokens(tokens, 1.0)


def test_sampler_shifts_once_and_stays_in_train_split():
    tokens = np.arange(5000, dtype=np.uint16)  # token i == position i makes the shift visible
    train, val = data.split_tokens(tokens)
    s = data.BatchSampler(train, batch_size=8, seq_len=32, seed=1)
    for _ in range(20):
        x, y = s.next()
        assert x.shape == y.shape == (8, 32) and x.dtype == torch.int64
        assert torch.equal(y, x + 1)  # targets = inputs shifted by exactly one
        assert int(y.max()) < len(train)  # never a validation token
    xv, yv = next(data.val_batches(val, 4, 16))
    assert torch.equal(yv, xv + 1) and int(xv.min()) == len(train)


def test_sampler_state_and_ranks():
    tokens = np.arange(20000, dtype=np.uint16)
    a = data.BatchSampler(tokens, 8, 16, seed=3)
    first = [a.next() for _ in range(5)]
    b = data.BatchSampler(tokens, 8, 16, seed=3)
    b.next(), b.next()
    c = data.BatchSampler(tokens, 8, 16, seed=0)
    c.load_state_dict(b.state_dict())
    assert torch.equal(c.next()[0], first[2][0])  # the state alone restores the position
    assert not torch.equal(data.BatchSampler(tokens, 8, 16, seed=4).next()[0], first[0][0])
    # data parallel: rank r of 2 takes rows r::2 of the same global batch
    r0 = data.BatchSampler(tokens, 8, 16, seed=3, rank=0, world_size=2).next()[0]
    r1 = data.BatchSampler(tokens, 8, 16, seed=3, rank=1, world_size=2).next()[0]
    assert torch.equal(torch.stack([r0, r1], 1).reshape(8, 16), first[0][0])


def test_val_batches_cover_the_split_without_overlap():
    val = np.arange(1000, dtype=np.uint16)
    xs = torch.cat([x for x, _ in data.val_batches(val, 4, 64)])
    assert xs.shape == (15, 64)  # (1000 - 1) // 64 windows of 65 tokens, overlapping by the one shift
    assert torch.equal(xs.flatten(), torch.arange(15 * 64))
    assert len(list(data.val_batches(val, 4, 64, max_batches=2))) == 2
