"""The machine a run uses: device checks and names, and a CPU allocator setting."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import re
import sys

import torch

from models import UserError

# glibc returns freed blocks above 128 KiB to the OS at once (mmap threshold), so every
# activation of a CPU forward/backward is page-faulted in again: keeping them in the heap
# makes attack steps faster (docs/PERFORMANCE.md). (mallopt option numbers.)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # the largest value glibc accepts on 64-bit


def check_device_kind(device: str, auto: bool = False) -> None:
    """One clear line for a device no run takes (gpu, tpu, meta), before torch is asked;
    `auto`: "auto" is allowed too (the options' default)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps" + ("|auto" if auto else ""), device):
        raise UserError(
            f"device {device!r} is not usable here (the benchmark runs on cpu, cuda, cuda:N or mps); use --device cpu"
        )


def check_device(device: str) -> None:
    """One clear line for a device this machine does not have."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"device {device!r} is not usable here ({reason}); use --device cpu") from None


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when a GPU is visible, else "cpu"; anything else is checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    return device


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({platform.processor() or platform.machine()})"


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the heap (the GLIBC_TUNABLES mmap/trim thresholds,
    set at run time); returns False where there is no glibc. Only affects speed."""
    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
            and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        )
    except (OSError, AttributeError):  # a libc without mallopt (musl)
        return False


def tolerant_streams() -> None:
    """Let stdout and stderr write any text: a character their encoding lacks (λ, ε on an
    ASCII terminal, PYTHONIOENCODING=ascii) is written as a backslash escape, never an
    UnicodeEncodeError in --help, the plan or a log line."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
