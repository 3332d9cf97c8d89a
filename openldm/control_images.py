"""Control images made from the user's pictures, with no model to download: the ControlNets'
preprocessors that are plain image processing.

- ``canny``: Canny edges (Gaussian blur, Sobel gradients, non-maximum suppression, double threshold
  and hysteresis; thresholds 100 and 200 on 0..255 gradients, as ControlNet's canny default), white
  edges on black;
- ``scribble``: dark strokes on a light page -> white strokes on black (a threshold at the middle grey);
- ``threshold``: the same without inverting (light strokes stay white);
- ``invert``: 255 minus the image (a black-on-white line drawing for a lineart/scribble ControlNet);
- ``none``: the image as given (an edge map, a depth map, a pose drawing made elsewhere).

``depth`` runs a MiDaS estimator the user gives (see :func:`openldm.pipelines.control.depth_control_image`);
the other preprocessors that are networks (``openpose``, ``hed``, ``mlsd``, ``lineart``, ``normal``,
``seg``...) are named in :data:`NEEDS_A_MODEL` with what they would need.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image, ImageFilter

Preprocessor = Literal["none", "canny", "scribble", "threshold", "invert"]
PREPROCESSORS: tuple[Preprocessor, ...] = ("none", "canny", "scribble", "threshold", "invert")
NEEDS_A_MODEL = {
    "openpose": "the OpenPose body model (body_pose_model.pth)",
    "hed": "the HED edge model (ControlNetHED.pth)",
    "mlsd": "the M-LSD line model (mlsd_large_512_fp32.pth)",
    "lineart": "the lineart model (sk_model.pth)",
    "normal": "a normal-map model (e.g. scannet.pt of NormalBae)",
    "seg": "a segmentation model (e.g. upernet_global_small.pth)",
}


def _gray(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float32)


def _to_rgb(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8)).convert("RGB")


def canny(image: Image.Image, low: float = 100.0, high: float = 200.0) -> Image.Image:
    """Canny edges of ``image``: white (255) edge pixels on black."""
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got {low} and {high}")
    gray = np.asarray(image.convert("L").filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
    padded = np.pad(gray, 1, mode="edge")
    gx = (
        padded[:-2, 2:] + 2 * padded[1:-1, 2:] + padded[2:, 2:]
        - padded[:-2, :-2] - 2 * padded[1:-1, :-2] - padded[2:, :-2]
    )  # fmt: skip
    gy = (
        padded[2:, :-2] + 2 * padded[2:, 1:-1] + padded[2:, 2:]
        - padded[:-2, :-2] - 2 * padded[:-2, 1:-1] - padded[:-2, 2:]
    )  # fmt: skip
    magnitude = np.hypot(gx, gy)
    thin = _non_maximum_suppression(magnitude, np.arctan2(gy, gx))
    strong = thin >= high
    weak = (thin >= low) & ~strong
    return _to_rgb(_hysteresis(strong, weak) * 255.0)


def _non_maximum_suppression(magnitude: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Keep a pixel where its gradient magnitude is a maximum along the gradient direction."""
    direction = (np.round(angle / (np.pi / 4)) % 4).astype(int)  # 0: horizontal, 1: 45, 2: 90, 3: 135
    padded = np.pad(magnitude, 1)
    h, w = magnitude.shape
    offsets = {0: ((0, 1), (0, -1)), 1: ((1, 1), (-1, -1)), 2: ((1, 0), (-1, 0)), 3: ((1, -1), (-1, 1))}
    keep = np.zeros_like(magnitude, dtype=bool)
    for code, ((dy1, dx1), (dy2, dx2)) in offsets.items():
        first = padded[1 + dy1 : 1 + dy1 + h, 1 + dx1 : 1 + dx1 + w]
        second = padded[1 + dy2 : 1 + dy2 + h, 1 + dx2 : 1 + dx2 + w]
        keep |= (direction == code) & (magnitude > first) & (magnitude >= second)  # ties: one side
    return np.where(keep, magnitude, 0.0)


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """Strong pixels and the weak pixels 8-connected to them (grown until nothing changes)."""
    edges = strong.copy()
    while True:
        padded = np.pad(edges, 1)
        h, w = edges.shape
        near = np.zeros_like(edges)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                near |= padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        grown = edges | (weak & near)
        if np.array_equal(grown, edges):
            return edges.astype(np.float32)
        edges = grown


def preprocess(image: Image.Image, kind: str) -> Image.Image:
    """The control image ``kind`` makes of ``image`` (RGB)."""
    if kind == "none":
        return image.convert("RGB")
    if kind == "canny":
        return canny(image)
    if kind in ("scribble", "threshold"):
        lines = _gray(image) < 128 if kind == "scribble" else _gray(image) >= 128
        return _to_rgb(lines * 255.0)
    if kind == "invert":
        return _to_rgb(255.0 - np.asarray(image.convert("RGB"), dtype=np.float32))
    if kind in NEEDS_A_MODEL:
        raise ValueError(
            f"the {kind} preprocessor needs {NEEDS_A_MODEL[kind]}, which openldm does not download"
        )
    raise ValueError(f"unknown preprocessor {kind!r}; use one of {', '.join(PREPROCESSORS)}")
