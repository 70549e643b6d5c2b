"""The OpenMP wait-policy default: what libgomp itself reports after `import dsv3` (OMP_DISPLAY_ENV=VERBOSE)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libgomp (torch's Linux OpenMP)")


def libgomp_sees(code: str, **env) -> tuple[dict, str]:
    """Run `code` in a fresh python; libgomp prints its settings to stderr when it loads."""
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # (our own import set it)
    env = {**base, "PYTHONPATH": str(ROOT), "OMP_DISPLAY_ENV": "VERBOSE", **env}
    p = subprocess.run([sys.executable, "-c", code + "\nimport torch; torch.ones(4) + 1"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    settings = dict(re.findall(r"^\s+(\w+) = '([^']*)'", p.stderr, re.M))
    return settings, p.stderr


def test_import_dsv3_makes_waiting_threads_sleep():
    seen, err = libgomp_sees("import dsv3, os; assert os.environ['OMP_WAIT_POLICY'] == 'PASSIVE'")
    assert seen["GOMP_SPINCOUNT"] == "0"  # PASSIVE: a waiting thread sleeps at once instead of spinning
    assert "RuntimeWarning" not in err
    seen, _ = libgomp_sees("import dsv3.train")  # so does `python -m dsv3` and any submodule import
    assert seen["GOMP_SPINCOUNT"] == "0"


def test_a_policy_the_user_set_is_kept():
    seen, err = libgomp_sees("import dsv3, os; assert os.environ['OMP_WAIT_POLICY'] == 'ACTIVE'",
                             OMP_WAIT_POLICY="ACTIVE")
    assert seen["OMP_WAIT_POLICY"] == "ACTIVE" and int(seen["GOMP_SPINCOUNT"]) > 300000
    assert "RuntimeWarning" not in err


def test_torch_imported_first_is_too_late_and_warns():
    seen, err = libgomp_sees("import torch, dsv3, os; assert 'OMP_WAIT_POLICY' not in os.environ")
    assert seen["GOMP_SPINCOUNT"] == "300000"  # libgomp's default (spin ~3 ms) was fixed when torch loaded
    assert "RuntimeWarning: torch was imported before dsv3" in err and "Import dsv3 before torch" in err
