"""Devices: which one to run on, whether it is there, and how much memory it has free.

Checked before anything is loaded or computed, so ``--device cuda`` on a machine without CUDA is one
clear error instead of a traceback from deep inside torch.

On a CPU with glibc, :func:`keep_freed_host_memory` makes freed memory stay with the process for the
next allocation (see there); :func:`available_memory` counts that memory as free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from pathlib import Path

import torch

KNOWN_TYPES = ("cpu", "cuda", "mps")
_MEMINFO = Path("/proc/meminfo")


class DeviceError(ValueError):
    """A device that does not exist on this machine, or a name that is no device."""


def default_device() -> torch.device:
    """CUDA when there is a GPU, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device ``name`` names (None: :func:`default_device`); :class:`DeviceError` when this machine
    does not have it."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(
            f"unknown device {str(name)!r}; use one of cpu, cuda, cuda:N (the Nth GPU) or mps"
        ) from None
    if device.type == "cuda":
        _check_cuda(device)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device 'mps' is not available: this machine has no Apple GPU; use cpu")
    elif device.type not in KNOWN_TYPES:
        raise DeviceError(f"device type {device.type!r} is not supported; use cpu, cuda or mps")
    return device


def _check_cuda(device: torch.device) -> None:
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise DeviceError(
            f"device {str(device)!r} is not available: this torch ({torch.__version__}, {build}) "
            "finds no CUDA GPU; use --device cpu (or install torch for your GPU)"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"device {str(device)!r} does not exist: this machine has {count} CUDA GPU(s)")


def available_memory(device: torch.device) -> int | None:
    """Bytes that a computation on ``device`` can still allocate; None when it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    host = _host_available()
    return None if host is None else host + _held_free_bytes()


def _host_available() -> int | None:
    """The kernel's estimate of memory available without swapping (Linux), else the physical memory."""
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return None


# glibc's mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
KEEP_MEMORY_VARIABLE = "OPENLDM_KEEP_FREED_MEMORY"  # "0": leave the C allocator as it is


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost",
        )
    ]  # fmt: skip


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "mallinfo2") else None


_keeping = False  # whether keep_freed_host_memory() is in effect


def keep_freed_host_memory() -> bool:
    """Let the C allocator (glibc's) keep memory the process frees, to give it to the next allocation.

    By default glibc maps every allocation over 32 MB afresh and returns it at free, so each of a
    denoising step's large activations is faulted in page by page, zeroed by the kernel, at every
    step: on 2 cores about 300 000 page faults and 1 s of a 9 s SD 1.5 step at 512. Kept, the process's
    memory stays at its peak between steps and generations (as a GPU's caching allocator does) and
    the faults are gone. Done once per process, by :func:`openldm.load` for a CPU; a no-op without
    glibc or with the environment variable ``OPENLDM_KEEP_FREED_MEMORY=0``. True when in effect."""
    global _keeping
    libc = _glibc()
    if _keeping or libc is None or os.environ.get(KEEP_MEMORY_VARIABLE, "1") == "0":
        return _keeping
    # Large blocks from the heap, not mmap, and the heap's free top never given back.
    _keeping = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _keeping


def _held_free_bytes() -> int:
    """Bytes the C allocator holds free for this process (0 unless :func:`keep_freed_host_memory`)."""
    libc = _glibc()
    if libc is None or not _keeping:
        return 0
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().fordblks)
