"""The procedural shapes dataset: scene sampling, the torch Dataset, and evaluation caption sets.

Sample ``i`` of ``ShapesDataset(seed)`` is drawn from a generator seeded by ``(seed, i)`` alone, so it is
the same in any order, in any DataLoader worker, on any machine. Colour-kind pairs in ``held_out`` are
never drawn for training; ``evaluation_scenes(..., held_out_only=True)`` makes scenes that contain them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from openldm.shapes.captions import caption, explicit_caption
from openldm.shapes.render import (
    BACKGROUNDS,
    COLOURS,
    KINDS,
    OBJECT_DEPTH,
    PALETTE,
    POSITIONS,
    RGB,
    SIZES,
    Scene,
    ShapeObject,
    render,
)

# One held-out kind per colour at most and every kind held out once or twice, so each held-out word is
# still seen in training with other partners. ("red", "circle") stays seen: it is the README's prompt.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "triangle"),
        ("yellow", "circle"),
        ("green", "rectangle"),
        ("blue", "square"),
        ("pink", "triangle"),
    }
)
OBJECT_COUNTS = (1, 2, 3)
OBJECT_COUNT_WEIGHTS = (0.4, 0.35, 0.25)
DENSE_COUNTS = (4, 9)  # shapes in a dense (autoencoder) scene, inclusive
REPEAT_RATE = 0.25  # chance that a further object copies the colour and kind of an earlier one
EVAL_STREAM = 1  # evaluation scenes come from a generator stream disjoint from training samples'
CANONICAL_STREAM = 99  # whether a training sample's caption is the canonical one (canonical_fraction)
# Off-palette paints (autoencoder images only) stay at least this far (RGB distance) from every palette
# colour: they teach outlines apart from colours without showing any palette colour-kind pair.
OFF_PALETTE_DISTANCE = 60.0
_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.asarray(list(PALETTE.values()), dtype=np.float64)


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    caption: str
    scene: Scene
    masks: np.ndarray  # [n_objects, H, W] bool
    depth: np.ndarray  # [H, W] float32, larger = nearer


def _check_held_out(held_out: frozenset[tuple[str, str]]) -> None:
    for colour, kind in held_out:
        if colour not in COLOURS or kind not in KINDS:
            raise ValueError(f"held-out pair {(colour, kind)} is not a (colour, kind) of {COLOURS} x {KINDS}")


def allowed_pairs(background: str, held_out: frozenset[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(c, k) for c in COLOURS for k in KINDS if c != background and (c, k) not in held_out]


def _make_object(rng: np.random.Generator, pair: tuple[str, str], position: str) -> ShapeObject:
    size_index = int(rng.integers(len(SIZES)))
    size = tuple(SIZES)[size_index]
    limit = 0.9 * (1.0 - SIZES[size]) / 2
    offset = (float(rng.uniform(-limit, limit)), float(rng.uniform(-limit, limit)))
    # Larger shapes stand nearer; the uniform part keeps depths distinct within a scene.
    low, high = OBJECT_DEPTH
    depth = low + (high - low) * (size_index + float(rng.uniform(0.05, 0.95))) / len(SIZES)
    return ShapeObject(kind=pair[1], colour=pair[0], size=size, position=position, depth=depth, offset=offset)


def sample_scene(
    rng: np.random.Generator,
    held_out: frozenset[tuple[str, str]] = frozenset(),
    first: tuple[str, str] | None = None,
    count: int | None = None,
) -> Scene:
    """A random scene whose objects avoid ``held_out`` pairs, except ``first`` when given.

    ``count`` fixes the number of objects; by default it is drawn from ``OBJECT_COUNTS``.
    """
    _check_held_out(held_out)
    if first is not None:
        backgrounds = [b for b in BACKGROUNDS if b != first[0]]
    else:
        backgrounds = list(BACKGROUNDS)
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    if count is None:
        count = int(rng.choice(OBJECT_COUNTS, p=OBJECT_COUNT_WEIGHTS))
    elif count not in OBJECT_COUNTS:
        raise ValueError(f"a scene has one of {OBJECT_COUNTS} objects, got {count}")
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    pairs = allowed_pairs(background, held_out)
    if not pairs:
        raise ValueError(f"every colour-kind pair is held out on a {background} background")
    chosen: list[tuple[str, str]] = []
    for i in range(count):
        if i == 0 and first is not None:
            chosen.append(first)
        elif chosen and rng.random() < REPEAT_RATE:
            chosen.append(chosen[int(rng.integers(len(chosen)))])
        else:
            chosen.append(pairs[int(rng.integers(len(pairs)))])
    objects = tuple(_make_object(rng, pair, POSITIONS[int(c)]) for pair, c in zip(chosen, cells, strict=True))
    return Scene(background=background, objects=objects)


def dense_scene(rng: np.random.Generator, held_out: frozenset[tuple[str, str]] = frozenset()) -> Scene:
    """A scene of ``DENSE_COUNTS`` shapes (any allowed colour-kind pairs) for training the autoencoder.

    Caption scenes are mostly background (one to three shapes cover a few percent of the pixels), so an
    autoencoder trained on them alone spends its updates on flat colour and learns the shapes slowly;
    these scenes give it several times more shape edges and colours per image.
    """
    _check_held_out(held_out)
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    count = int(rng.integers(DENSE_COUNTS[0], DENSE_COUNTS[1] + 1))
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    pairs = allowed_pairs(background, held_out)
    objects = tuple(_make_object(rng, pairs[int(rng.integers(len(pairs)))], POSITIONS[int(c)]) for c in cells)
    return Scene(background=background, objects=objects)


def off_palette_colour(
    rng: np.random.Generator, kind: str | None = None, held_out: frozenset[tuple[str, str]] = frozenset()
) -> RGB:
    """A random RGB colour at least ``OFF_PALETTE_DISTANCE`` from every palette colour and, for a shape
    of ``kind``, not nearest to a colour that ``held_out`` pairs with that kind (so that no painted
    shape reads as a held-out pair: a yellowish circle is still never drawn when yellow-circle is held
    out)."""
    while True:
        colour = rng.integers(0, 256, size=3)
        distances = np.sqrt(((_PALETTE_RGB - colour) ** 2).sum(axis=1))
        nearest = _PALETTE_NAMES[int(distances.argmin())]
        if distances.min() >= OFF_PALETTE_DISTANCE and (nearest, kind) not in held_out:
            return (int(colour[0]), int(colour[1]), int(colour[2]))


class ShapesDataset(Dataset):
    """``length`` captioned shape images of ``size`` pixels, sample ``i`` fixed by ``(seed, i)``.

    With ``dense_fraction`` > 0 that fraction of the samples are :func:`dense_scene` s (for the
    autoencoder; their captions are empty). With ``recolour_fraction`` > 0 that fraction of the samples
    paint every object in an off-palette colour (:func:`off_palette_colour`; caption empty): an
    autoencoder that only ever sees palette pairs learns to draw a shape's outline from its colour
    ("yellow" is never a circle) and fails on held-out pairs; random paints make it encode the outline.
    With ``canonical_fraction`` > 0 that fraction of the captioned samples take the canonical
    :func:`~openldm.shapes.captions.explicit_caption` (every object's colour, kind and cell stated in
    plain words) instead of a varied one; the draw has a stream of its own, so images and scenes stay
    the same.
    """

    def __init__(
        self,
        seed: int,
        size: int = 64,
        length: int = 100_000,
        held_out: frozenset[tuple[str, str]] = HELD_OUT,
        dense_fraction: float = 0.0,
        recolour_fraction: float = 0.0,
        canonical_fraction: float = 0.0,
    ) -> None:
        _check_held_out(held_out)
        if length <= 0:
            raise ValueError(f"dataset length must be positive, got {length}")
        for name, fraction in (
            ("dense_fraction", dense_fraction),
            ("recolour_fraction", recolour_fraction),
            ("canonical_fraction", canonical_fraction),
        ):
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {fraction}")
        self.seed, self.size, self.length, self.held_out = seed, size, length, frozenset(held_out)
        self.dense_fraction, self.recolour_fraction = dense_fraction, recolour_fraction
        self.canonical_fraction = canonical_fraction

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of {self.length} samples")
        rng = np.random.default_rng([self.seed, i])
        if self.dense_fraction and rng.random() < self.dense_fraction:
            scene = dense_scene(rng, self.held_out)
            text = ""
        else:
            scene = sample_scene(rng, self.held_out)
            text = caption(scene, rng)
        paints = None
        if self.recolour_fraction and rng.random() < self.recolour_fraction:
            paints = [off_palette_colour(rng, o.kind, self.held_out) for o in scene.objects]
            text = ""
        if text and self.canonical_fraction:
            if np.random.default_rng([self.seed, i, CANONICAL_STREAM]).random() < self.canonical_fraction:
                text = explicit_caption(scene)
        rendered = render(scene, self.size, paints)
        return Sample(rendered.image, text, scene, rendered.masks, rendered.depth)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float32 CHW tensor in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def collate(samples: list[Sample]) -> tuple[torch.Tensor, list[str]]:
    """A DataLoader ``collate_fn``: images as [B, 3, H, W] in [-1, 1] and their captions."""
    return torch.stack([to_tensor(s.image) for s in samples]), [s.caption for s in samples]


def evaluation_scenes(
    seed: int, n: int, held_out_only: bool, held_out: frozenset[tuple[str, str]] = HELD_OUT
) -> list[tuple[str, Scene]]:
    """``n`` (explicit caption, scene) pairs.

    Seen scenes follow the training distribution (no held-out pair, one to three objects). Held-out scenes
    hold a single object whose colour-kind pair is held out, cycling through the pairs, so their scores
    measure exactly the unseen combinations.
    """
    _check_held_out(held_out)
    if held_out_only and not held_out:
        raise ValueError("held_out_only=True needs at least one held-out pair")
    ordered = sorted(held_out)
    result = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, EVAL_STREAM])
        first = ordered[i % len(ordered)] if held_out_only else None
        scene = sample_scene(rng, held_out, first=first, count=1 if held_out_only else None)
        result.append((explicit_caption(scene), scene))
    return result
