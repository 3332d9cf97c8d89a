"""Scenes of flat coloured shapes and their renderer (image, per-object masks, depth map).

A scene is a solid background with one to three shapes, each centred (with a little jitter) in its own
cell of a 3x3 grid, so shapes never overlap and every position word ("top left", "centre", ...) is exact.
Each pixel's coverage by a shape is measured on a ``SUPERSAMPLE`` x ``SUPERSAMPLE`` grid of points inside it
(rendering at 4x and box-downsampling), which gives natural anti-aliased edges; the masks are the same
coverage maps thresholded at one half.

Depth follows the MiDaS convention (larger = nearer, a relative inverse depth in [0, 1]): the background
is a floor plane receding upwards (0.05 at the top row of pixels, 0.25 at the bottom row) and each shape
is a flat card standing at its own ``depth`` (in [0.4, 1.0]), distinct within a scene.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Far apart in RGB (no two object colours closer than ~100): a small generative model at 64x64 blurs and
# shifts colours, and the evaluator still has to tell them apart.
RGB = tuple[int, int, int]
PALETTE: dict[str, RGB] = {
    "red": (220, 30, 30),
    "orange": (245, 130, 0),
    "yellow": (250, 235, 30),
    "green": (30, 160, 50),
    "cyan": (0, 200, 220),
    "blue": (30, 60, 210),
    "purple": (130, 40, 190),
    "pink": (250, 120, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
BACKGROUNDS: tuple[str, ...] = COLOURS + ("white", "black")
# Silhouettes that stay apart when blurred (an f=8 autoencoder draws a 13-19 px shape from about two
# latent pixels): the triangle's mass sits low, the rectangle (a 2:1 horizontal bar) is elongated, the
# square has corners the circle lacks. A diamond, tried first, came out of the autoencoder as a disc.
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "rectangle")
# Kinds the renderer draws but the dataset never shows: new concepts to teach a trained model (openldm
# finetune). The pillar is an upright bar (the dataset's rectangles all lie flat). Through the embedded
# autoencoder's 8x8 latents a pillar comes back as a pillar (23 of 24 images), while a hexagon, a
# diamond and a plus sign all come back as discs (0 of 24): those the embedded model could not show.
NEW_KINDS: tuple[str, ...] = ("pillar",)
ALL_KINDS = KINDS + NEW_KINDS
SIZES: dict[str, float] = {"small": 0.6, "medium": 0.75, "large": 0.9}  # bounding box side / cell side
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "centre",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
SUPERSAMPLE = 4
BACKGROUND_DEPTH = (0.05, 0.25)  # top row, bottom row
OBJECT_DEPTH = (0.4, 1.0)


def cell_of(position: str) -> tuple[int, int]:
    """(row, column) of a position name on the 3x3 grid."""
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; expected one of {POSITIONS}")
    return divmod(POSITIONS.index(position), 3)


@dataclass(frozen=True)
class ShapeObject:
    """One shape. ``offset`` is the jitter of its centre inside its cell, as a fraction of the cell side."""

    kind: str
    colour: str
    size: str
    position: str
    depth: float = 0.7
    offset: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if self.kind not in ALL_KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; expected one of {ALL_KINDS}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {COLOURS}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {tuple(SIZES)}")
        cell_of(self.position)
        limit = (1.0 - SIZES[self.size]) / 2
        if max(abs(self.offset[0]), abs(self.offset[1])) > limit + 1e-9:
            raise ValueError(
                f"offset {self.offset} moves a {self.size} shape out of its cell (limit {limit})"
            )
        if not OBJECT_DEPTH[0] <= self.depth <= OBJECT_DEPTH[1]:
            raise ValueError(f"depth {self.depth} outside {OBJECT_DEPTH}")


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ShapeObject, ...]

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; expected one of {BACKGROUNDS}")
        if not 1 <= len(self.objects) <= len(POSITIONS):
            raise ValueError(f"a scene has 1 to {len(POSITIONS)} objects, got {len(self.objects)}")
        positions = [o.position for o in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"two objects share a grid cell: {positions}")
        if any(o.colour == self.background for o in self.objects):
            raise ValueError(f"an object has the background colour {self.background!r}")


@dataclass(frozen=True)
class Rendered:
    image: Image.Image  # RGB
    masks: np.ndarray  # [n_objects, H, W] bool, coverage >= 1/2
    depth: np.ndarray  # [H, W] float32, MiDaS convention (larger = nearer)


def _inside(kind: str, x: np.ndarray, y: np.ndarray, h: float) -> np.ndarray:
    """Whether points (x, y), relative to the bounding-box centre, fall in a shape of half-side ``h``."""
    if kind == "circle":
        return x * x + y * y <= h * h
    if kind == "square":
        return (np.abs(x) <= h) & (np.abs(y) <= h)
    if kind == "triangle":  # apex up, base along the bottom of the box
        return (y <= h) & (np.abs(x) <= (y + h) / 2)
    if kind == "rectangle":  # as wide as the box, half as tall
        return (np.abs(x) <= h) & (np.abs(y) <= h / 2)
    if kind == "pillar":  # as tall as the box, half as wide
        return (np.abs(x) <= h / 2) & (np.abs(y) <= h)
    raise ValueError(f"unknown kind {kind!r}; expected one of {ALL_KINDS}")


def shape_coverage(
    kind: str, cx: float, cy: float, side: float, size: int, window: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """Fraction of each pixel covered by a shape, float32 in [0, 1], over a ``size`` x ``size`` image.

    The bounding box is ``side`` wide and centred at (cx, cy), in pixels, pixel (i, j) spanning
    [j, j + 1) x [i, i + 1). Each pixel is sampled at ``SUPERSAMPLE``^2 evenly spaced points.
    ``window`` = (top, left, height, width) restricts the result to that block of pixels.
    """
    top, left, height, width = window if window is not None else (0, 0, size, size)
    ys = top + (np.arange(height * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
    xs = left + (np.arange(width * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
    inside = _inside(kind, xs[None, :] - cx, ys[:, None] - cy, side / 2)
    return inside.reshape(height, SUPERSAMPLE, width, SUPERSAMPLE).mean(axis=(1, 3), dtype=np.float32)


def coverage(obj: ShapeObject, size: int) -> np.ndarray:
    """Fraction of each output pixel covered by the object's shape, [size, size] float32 in [0, 1]."""
    cell = size / 3
    row, col = cell_of(obj.position)
    cx = (col + 0.5 + obj.offset[0]) * cell
    cy = (row + 0.5 + obj.offset[1]) * cell
    return shape_coverage(obj.kind, cx, cy, SIZES[obj.size] * cell, size)


def background_depth(size: int) -> np.ndarray:
    near_top, near_bottom = BACKGROUND_DEPTH
    rows = np.linspace(near_top, near_bottom, size, dtype=np.float32)
    return np.repeat(rows[:, None], size, axis=1)


def render(scene: Scene, size: int = 64, colours: Sequence[RGB] | None = None) -> Rendered:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image with its masks and depth map.

    ``colours`` (one RGB per object) paints the objects in those colours instead of their palette ones.
    """
    if size < 24:
        raise ValueError(f"image size {size} is too small to draw shapes; use 24 pixels or more")
    if colours is not None and len(colours) != len(scene.objects):
        raise ValueError(f"{len(colours)} colours given for a scene of {len(scene.objects)} objects")
    paints = [PALETTE[o.colour] for o in scene.objects] if colours is None else list(colours)
    rgb = np.empty((size, size, 3), dtype=np.float32)
    rgb[:] = PALETTE[scene.background]
    depth = background_depth(size)
    masks = np.zeros((len(scene.objects), size, size), dtype=bool)
    for i, (obj, paint) in enumerate(zip(scene.objects, paints, strict=True)):
        alpha = coverage(obj, size)
        rgb += alpha[..., None] * (np.asarray(paint, dtype=np.float32) - rgb)
        depth += alpha * (obj.depth - depth)
        masks[i] = alpha >= 0.5
    image = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    return Rendered(image=image, masks=masks, depth=depth)
