"""Overlapping tiles and their blending windows, for images processed piece by piece.

Along each axis of length ``length`` the tiles have side ``min(tile, length)`` and their starts are
spread evenly from 0 to ``length - tile``, as few as needed for neighbours to overlap by at least
``overlap``. Each tile is weighted by a window that rises smoothly (raised cosine) across the part
it shares with its neighbour and is 1 elsewhere; the blend divides by the summed weights, so where
two tiles overlap their outputs cross-fade and elsewhere each pixel comes from exactly one tile.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tile:
    """A rectangle of the input: rows ``top : top + height``, columns ``left : left + width``."""

    top: int
    left: int
    height: int
    width: int


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of the tiles along one axis (one tile of the whole axis when it fits)."""
    if tile >= length:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def tiles(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    """The tiles that cover a ``height`` x ``width`` image, row by row."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"tiles need tile >= 1 and 0 <= overlap < tile, got tile {tile}, overlap {overlap}")
    rows, cols = min(tile, height), min(tile, width)
    return [
        Tile(top, left, rows, cols)
        for top in tile_starts(height, tile, overlap)
        for left in tile_starts(width, tile, overlap)
    ]


def _ramp(size: int) -> torch.Tensor:
    """``size`` values rising from near 0 to near 1 (raised cosine); a falling ramp is its reverse."""
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    return torch.sin(0.5 * math.pi * centres) ** 2


def axis_window(start: int, size: int, starts: list[int], scale: int = 1) -> torch.Tensor:
    """The window of the tile at ``start`` along an axis whose tiles start at ``starts``.

    ``scale`` stretches it for an output ``scale`` times the input's size (the upscaler's 4x pixels).
    """
    window = torch.ones(size * scale, dtype=torch.float64)
    before = [s for s in starts if s < start]
    after = [s for s in starts if s > start]
    if before:  # rise across the overlap with the previous tile
        shared = (max(before) + size - start) * scale
        window[:shared] *= _ramp(shared)
    if after:  # fall across the overlap with the next tile
        shared = (start + size - min(after)) * scale
        window[size * scale - shared :] *= _ramp(shared).flip(0)
    return window


def tile_window(tile: Tile, all_tiles: list[Tile], scale: int = 1) -> torch.Tensor:
    """The 2-D float32 window [height * scale, width * scale] of ``tile`` among ``all_tiles``."""
    tops = sorted({t.top for t in all_tiles})
    lefts = sorted({t.left for t in all_tiles})
    rows = axis_window(tile.top, tile.height, tops, scale)
    cols = axis_window(tile.left, tile.width, lefts, scale)
    return (rows[:, None] * cols[None, :]).float()


class Blender:
    """Accumulates weighted tiles of an output ``scale`` times the tiles' input size, then normalises.

    With a single tile covering everything the window is 1 and the result is that tile, bit for bit.
    """

    def __init__(
        self, shape: tuple[int, ...], all_tiles: list[Tile], scale: int, device: torch.device
    ) -> None:
        self.sum = torch.zeros(shape, dtype=torch.float32, device=device)
        self.weight = torch.zeros(shape[-2:], dtype=torch.float32, device=device)
        self.tiles = all_tiles
        self.scale = scale

    def add(self, tile: Tile, values: torch.Tensor) -> None:
        window = tile_window(tile, self.tiles, self.scale).to(self.sum.device)
        rows = slice(tile.top * self.scale, (tile.top + tile.height) * self.scale)
        cols = slice(tile.left * self.scale, (tile.left + tile.width) * self.scale)
        self.sum[..., rows, cols] += values.float() * window
        self.weight[rows, cols] += window

    def result(self) -> torch.Tensor:
        return self.sum / self.weight


def crop(x: torch.Tensor, tile: Tile) -> torch.Tensor:
    """The part of ``x`` (its last two dimensions) that ``tile`` covers."""
    return x[..., tile.top : tile.top + tile.height, tile.left : tile.left + tile.width]


def tile_by_tile(
    pieces: list[Tile],
    latent_shape: tuple[int, ...],
    image_shape: tuple[int, ...] | None,
    scale: int,
    device: torch.device,
    run_tile: Callable[[Tile], tuple[torch.Tensor, torch.Tensor | None]],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``run_tile(tile) -> (latents, decoded images or None)`` for every tile, cross-faded into the
    latents of ``latent_shape`` and the images of ``image_shape`` (None: nothing decoded)."""
    latents = Blender(latent_shape, pieces, 1, device)
    images = Blender(image_shape, pieces, scale, device) if image_shape is not None else None
    for piece in pieces:
        latent, decoded = run_tile(piece)
        latents.add(piece, latent)
        if images is not None and decoded is not None:
            images.add(piece, decoded)
    return latents.result(), images.result() if images is not None else None
