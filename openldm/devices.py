"""Devices: which one to run on, whether it is there, and how much memory it has free.

Checked before anything is loaded or computed, so ``--device cuda`` on a machine without CUDA is one
clear error instead of a traceback from deep inside torch.
"""

from __future__ import annotations

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
