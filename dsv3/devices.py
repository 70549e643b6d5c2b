"""Which device and which precision a run uses; training, generation, the playground and the notebooks ask here.

`resolve_device("auto")` takes CUDA, then Apple's MPS, then the CPU; `describe` names the choice in words.
`autocast_dtype` maps a precision name to the autocast dtype: "auto" is bf16 where the device computes it natively
(a CUDA GPU of compute capability 8.0 or later, MPS on macOS 14 or later), fp16 on an older CUDA GPU (T4, P100,
V100; the trainer then scales the loss with `torch.amp.GradScaler`), and fp32 (no autocast) on the CPU.
Does not move models or tensors, and does not know about kernels (each kernel checks its own device).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import SettingError

DTYPES = ("auto", "fp32", "bf16", "fp16")  # the precision names TrainConfig.dtype and --dtype accept


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return backend is not None and backend.is_available()


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """A torch.device from a name: "auto" (or None) = CUDA if available, else MPS, else the CPU."""
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    return torch.device(name)


def check_device(name: str | None) -> None:
    """A --device value torch cannot parse or this machine does not have: one line now, not a traceback later."""
    if name in (None, "auto"):
        return
    try:
        kind = torch.device(name).type
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    have = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": mps_available()}
    if not have.get(kind, True):
        raise ValueError(f"--device {name}: this machine (or this torch build) has no {kind.upper()} device; "
                         "use --device cpu")


def describe(device: torch.device) -> str:
    """The device in words for a one-line report: "cuda (NVIDIA T4)", "mps (Apple GPU)", "cpu"."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "mps":
        return "mps (Apple GPU)"
    return str(device)


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run natively (otherwise bf16 autocast on CPU is slower than fp32)."""
    if "AMX" in torch.backends.cpu.get_cpu_capability():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("amx_bf16", "avx512_bf16"))


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware (CUDA: compute capability 8.0+, not emulated; MPS: macOS 14+)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "mps":
        return torch.backends.mps.is_macos_or_newer(14, 0)
    return cpu_has_native_bf16()


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision name (DTYPES), or None for plain fp32."""
    if dtype == "auto":
        if device.type == "cpu":
            return None  # bf16 on the CPU only when asked
        if native_bf16(device):
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else None
    if dtype == "bf16":
        if device.type == "cpu" and not cpu_has_native_bf16():
            raise SettingError("dtype 'bf16' on this CPU: no native bf16 matmul (AMX / AVX512-BF16); use fp32")
        return torch.bfloat16
    if dtype == "fp16":
        return torch.float16
    return None


def precision_name(amp: torch.dtype | None) -> str:
    """How a run computes, in words: "fp32", "bf16 autocast", "fp16 autocast + loss scaling"."""
    return {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + loss scaling"}[amp]
