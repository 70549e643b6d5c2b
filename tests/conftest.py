"""Shared fixtures: small configs that run in milliseconds on a CPU."""

import os
from pathlib import Path

import pytest
import torch

import dsv3

ROOT = Path(__file__).resolve().parents[1]
# Offline runs: the tokenizer BPE file and the corpus live in ../shared on CI and dev machines.
_shared = ROOT.parent / "shared"
if "TIKTOKEN_CACHE_DIR" not in os.environ and (_shared / "tiktoken").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_shared / "tiktoken")
if "DSV3_CORPUS" not in os.environ and (_shared / "data" / "tinyshakespeare.txt").is_file():
    os.environ["DSV3_CORPUS"] = str(_shared / "data" / "tinyshakespeare.txt")


def small_cfg(**overrides) -> dsv3.ModelConfig:
    """A 2-layer MLA + MoE model with a 512-token vocabulary."""
    base = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
                n_activated_experts=2, moe_inter_dim=32, dense_inter_dim=96, max_seq_len=128)
    base.update(overrides)
    return dsv3.ModelConfig.preset("174m", **base)


def depth_rates(drafts, depths, new) -> list[float]:
    """Drafts kept / drafted per depth 1, 2, .. counted here from speculative decoding's raw lists: per generated
    token in `new`, its draft and the depth that drafted it (depth None or 0: no draft)."""
    D = max((k or 0 for k in depths), default=0)
    kept = [[d == t for d, k, t in zip(drafts, depths, new, strict=True) if k == depth] for depth in range(1, D + 1)]
    return [sum(k) / len(k) for k in kept]


def make_moe(**overrides) -> dsv3.moe.MoE:
    """A MoE layer of `small_cfg` with weights large enough (std 0.2) that routing differs between tokens."""
    torch.manual_seed(123)
    m = dsv3.moe.MoE(small_cfg(**overrides))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return m


@pytest.fixture(autouse=True)
def _threads_restored():
    """Each test gets the thread count it started with back, and the governor unfixed. A CLI run in-process
    with `--threads 1` would otherwise leave 1 thread to every later test, and compiled graphs are guarded on
    the thread count: each change recompiles them."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    dsv3.threads._fixed = False


@pytest.fixture(scope="module")
def one_thread():
    """For files of tiny matmuls (`pytestmark = pytest.mark.usefixtures("one_thread")`): on a busy 2-core machine a
    second OpenMP thread made them ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cfg():
    return small_cfg()


@pytest.fixture
def model(cfg):
    torch.manual_seed(123)
    return dsv3.DeepSeekV3(cfg).eval()
