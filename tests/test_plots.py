"""plots.py: each figure draws the data it is given (checked on the artists) and saves a PNG."""

import matplotlib

matplotlib.use("Agg")  # headless

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dsv3 import plots  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_balance_ratio():
    loads = np.array([[1, 1, 1, 1], [4, 0, 0, 0], [2, 2, 0, 0]], dtype=float)
    assert plots.balance_ratio(loads).tolist() == [1.0, 4.0, 2.0]


def test_kv_cache_bars(tmp_path):
    fig = plots.kv_cache_bars(["MHA (9 heads)", "GQA", "MLA"], [69120, 23040, 34560], path=tmp_path / "kv.png")
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == [69120, 23040, 34560]
    assert [t.get_text() for t in fig.axes[0].texts] == ["69,120 B", "23,040 B", "34,560 B"]
    _png(tmp_path / "kv.png")


def test_router_balance(tmp_path):
    rng = np.random.default_rng(0)
    runs = {"a": rng.random((5, 2, 8)), "b": np.ones((5, 2, 8))}
    fig = plots.router_balance(runs, path=tmp_path / "r.png")
    line_ax = fig.axes[-1]
    lines = {ln.get_label(): ln.get_ydata() for ln in line_ax.get_lines() if not ln.get_label().startswith("_")}
    assert np.allclose(lines["b"], 1.0)
    assert np.allclose(lines["a"], plots.balance_ratio(runs["a"]).mean(axis=1))
    heat = fig.axes[0].images[0].get_array()
    assert heat.shape == (8, 5) and np.allclose(heat.sum(axis=0), 1.0)  # shares of the last layer, per step
    _png(tmp_path / "r.png")


def test_loss_curves_and_phases(tmp_path):
    fig = plots.loss_curves([1, 2, 3], [5.0, 4.0, 3.5], [3], [3.9], path=tmp_path / "l.png")
    assert [ln.get_ydata().tolist() for ln in fig.axes[0].get_lines()] == [[5.0, 4.0, 3.5], [3.9]]
    _png(tmp_path / "l.png")
    fig = plots.phase_curves(([1, 2], [5.0, 4.0], [2], [4.2]), ([3], [3.8], [3], [4.0]),
                             lr=([1, 2, 3], [1e-3, 5e-4, 1e-4]), best=(3, 4.0), path=tmp_path / "p.png")
    assert fig.axes[1].get_lines()[0].get_ydata().tolist() == [1e-3, 5e-4, 1e-4]
    star = [ln for ln in fig.axes[0].get_lines() if ln.get_marker() == "*"]
    assert len(star) == 1 and star[0].get_xydata().tolist() == [[3.0, 4.0]]
    assert "best checkpoint (step 3)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    fig = plots.loss_curves([1, 2, 3], [5.0, 4.0, 3.5], [2, 3], [4.1, 3.9], best=(3, 3.9))
    assert [ln.get_xydata().tolist() for ln in fig.axes[0].get_lines() if ln.get_marker() == "*"] == [[[3.0, 3.9]]]
    _png(tmp_path / "p.png")


def test_expert_usage(tmp_path):
    loads = np.zeros((4, 3, 8))
    loads[:, :, 0] = 1.0  # one expert takes everything
    fig = plots.expert_usage([10, 20, 30, 40], loads, path=tmp_path / "e.png")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3
    assert np.allclose(panels[0].images[0].get_array()[0], 1.0) and np.allclose(panels[0].images[0].get_array()[1:], 0)
    _png(tmp_path / "e.png")
