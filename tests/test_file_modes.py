"""Saved checkpoints, exported folders and the data caches get the user's umask mode, as a plain open() would give
them (files built under temporary names used to keep mkdtemp's 0700 and safetensors' / mkstemp's 0600)."""

import io
import os
import stat

import pytest
import torch

import dsv3
from dsv3 import data


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return dsv3.DeepSeekV3(dsv3.ModelConfig.preset("tiny", n_layers=1, dim=64, n_heads=2, kv_lora_rank=32,
                                                   max_seq_len=64))


def expect(mask: int, folder: bool = False) -> int:
    return (0o777 if folder else 0o666) & ~mask


def test_saved_and_copied_checkpoints_get_the_umask_mode(model, umask, tmp_path):
    for path in (dsv3.save_checkpoint(tmp_path / "run", model, step=1),
                 dsv3.save_checkpoint(tmp_path / "run", model, step=1, best=True),  # best/, then re-saved
                 dsv3.save_checkpoint(tmp_path / "run", model, step=1, best=True),
                 dsv3.checkpoint.copy_checkpoint(tmp_path / "run" / "step_000001", tmp_path / "copy")):
        assert mode(path) == expect(umask, folder=True), path
        for f in path.iterdir():
            assert mode(f) == expect(umask), f


def test_exported_files_get_the_umask_mode(model, umask, tmp_path):
    pytest.importorskip("transformers")
    from dsv3.export_hf import export_hf

    out = export_hf(model, tmp_path / "hf")
    files = sorted(out.iterdir())
    assert {f.name for f in files} >= {"config.json", "model.safetensors", "generation_config.json"}
    for f in files:
        assert mode(f) == expect(umask), f


def test_downloaded_corpus_and_token_cache_get_the_umask_mode(umask, tmp_path, monkeypatch):
    text = b"To be, or not to be: that is the question.\n"

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.close()

    monkeypatch.setenv("DSV3_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("DSV3_CORPUS", raising=False)
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_SHA256", __import__("hashlib").sha256(text).hexdigest())
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: Response(text))
    ids = data.load_tokens()
    assert data.get_tokenizer().decode(ids.tolist()) == text.decode()
    written = sorted(tmp_path.iterdir())
    assert [f.suffix for f in written] == [".npy", ".txt"]  # nothing left behind under a temporary name
    for f in written:
        assert mode(f) == expect(umask), f
