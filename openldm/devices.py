"""Devices: which one to run on, whether it is there, and how much memory it has free.

Checked before anything is loaded or computed, so ``--device cuda`` on a machine without CUDA is one
clear error instead of a traceback from deep inside torch.

On a CPU with glibc, :func:`reusing_freed_host_memory` keeps freed memory in the process for its next
allocation while sampling, where every step allocates what the last one freed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import threading
from collections.abc import Iterator
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
    return _host_available()


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


# glibc's mallopt parameters, and the values that restore its behaviour (its dynamic mmap threshold
# settles at its maximum, 32 MB on 64-bit, once large blocks have been freed; trimming at twice that)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_RESTORE = ((_M_MMAP_MAX, 65536), (_M_MMAP_THRESHOLD, 32 * 2**20), (_M_TRIM_THRESHOLD, 64 * 2**20))
KEEP_MEMORY_VARIABLE = "OPENLDM_KEEP_FREED_MEMORY"  # "0": leave the C allocator as it is


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_keeping = [0]  # how many reusing_freed_host_memory() blocks are open, in any thread
_keeping_lock = threading.Lock()


@contextlib.contextmanager
def reusing_freed_host_memory(device: torch.device) -> Iterator[bool]:
    """Within: the C allocator (glibc's) keeps the memory the process frees for its next allocation,
    when ``device`` is a CPU; on leaving, that memory goes back to the system. Yields whether in effect.

    By default glibc maps every allocation over 32 MB afresh and unmaps it at free, so each of a
    denoising step's large activations is faulted in page by page, zeroed by the kernel, at every
    step: on 2 cores about 300 000 page faults and 1 s of a 9 s SD 1.5 step at 512. Kept, a step's
    memory is the last step's (as a GPU's caching allocator does) and the faults are gone. The
    pipelines keep it over sampling only: one-pass work whose maps grow (the VAE's decode) would lay
    new blocks beside the holes of the last ones (``openldm txt2img`` of a fp16 SD 1.5 file at 512,
    kept throughout: peak RSS 4.73 GB against glibc's 3.65; over sampling only: 3.54). A no-op
    without glibc or with ``OPENLDM_KEEP_FREED_MEMORY=0``."""
    libc = _glibc()
    if device.type != "cpu" or libc is None or os.environ.get(KEEP_MEMORY_VARIABLE, "1") == "0":
        yield False
        return
    with _keeping_lock:
        _keeping[0] += 1
        if _keeping[0] == 1:  # large blocks from the heap, not mmap; the heap's free top kept
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield True
    finally:
        with _keeping_lock:
            _keeping[0] -= 1
            if _keeping[0] == 0:
                for parameter, value in _RESTORE:
                    libc.mallopt(parameter, value)
                libc.malloc_trim(0)
