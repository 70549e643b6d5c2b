"""Idle OpenMP threads sleep instead of spinning: OMP_WAIT_POLICY=PASSIVE unless the user chose a policy.

torch's CPU operators run on libgomp's thread pool. By default a thread that waits at a barrier spins for
about 3 ms before it sleeps; two torch processes on the same cores then burn each other's time slices
spinning, and each keeps only a few percent of its speed alone. With PASSIVE a waiting thread sleeps at
once, so two jobs share the cores instead (benchmarks/contention.py measures both).
libgomp reads the variable once, when it is loaded (by `import torch`), so this runs before dsv3 imports
torch. If libgomp is already loaded, setting it would do nothing: we warn and leave it alone.
"""

from __future__ import annotations

import os
import sys
import warnings

POLICY = "PASSIVE"


def libgomp_loaded() -> bool:
    """Whether libgomp is mapped into this process (then its wait policy is fixed)."""
    try:
        with open("/proc/self/maps") as f:
            return "libgomp" in f.read()
    except OSError:  # not Linux: assume torch brought it (macOS/Windows builds use other runtimes anyway)
        return "torch" in sys.modules


def apply_default() -> str | None:
    """Set OMP_WAIT_POLICY=PASSIVE if it is unset and still can take effect; return the policy in force."""
    if "OMP_WAIT_POLICY" in os.environ:
        return os.environ["OMP_WAIT_POLICY"]
    if libgomp_loaded():
        warnings.warn(
            "torch was imported before dsv3, so its OpenMP threads keep spinning while they wait (the wait "
            "policy is read when torch loads): a second torch job on the same CPU cores will slow both down "
            "many times over. Import dsv3 before torch, or set OMP_WAIT_POLICY=PASSIVE in the environment.",
            RuntimeWarning, stacklevel=2)
        return None
    os.environ["OMP_WAIT_POLICY"] = POLICY
    return POLICY


applied = apply_default()
