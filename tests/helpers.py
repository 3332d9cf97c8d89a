"""Comparison helpers for parity tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp_min(1e-12)
    return float((actual - expected).abs().max() / scale)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> float:
    """Assert the relative error is within ``tol``; return it so tests can report it."""
    err = relative_error(actual, expected)
    assert err <= tol, f"relative error {err:.3e} > {tol:.0e}"
    return err


# Printed last by a child Python: its peak memory in KiB. VmHWM is its own address space's; ru_maxrss
# would also count the test process's memory, which a forked child carries until it runs Python.
PRINT_PEAK_KIB = (
    "\nprint(next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM:')))\n"
)


SQUARE_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
}


def assert_images_match(name: str, ours: Any, theirs: Any, plain: Any, tol: float = 1e-3) -> float:
    """``ours`` within ``tol`` (max abs, [0, 1] pixels) of ``theirs``, which differs from ``plain`` (the
    image without the feature under test) by over 20 ``tol``: the feature does something."""
    err = float(np.abs(ours - theirs).max())
    print(f"{name}: max abs pixel error {err:.2e}")
    assert float(np.abs(theirs - plain).max()) > 20 * tol, f"{name}: the feature changes nothing"
    assert err <= tol, f"{name}: max abs pixel error {err:.2e}"
    return err


def write_squares(root, caption: str = "a {} square in the centre"):
    """A fine-tuning data folder: a coloured square on dark grey per colour, 64x64, with its caption."""
    from pathlib import Path

    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, rgb in SQUARE_COLOURS.items():
        image = Image.new("RGB", (64, 64), (20, 20, 20))
        image.paste(rgb, (16, 16, 48, 48))
        image.save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(caption.format(name))
    return root
