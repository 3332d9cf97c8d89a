"""Prompt fidelity of shape images: detect each object's colour, kind and position, and score a scene.

Detection knows the renderer's palette and geometry, nothing else (an analysis by synthesis):
1. The background is the palette colour nearest to most pixels; its actual RGB is the median of those
   pixels (generated images drift in colour).
2. A pixel is foreground when some object colour explains it as a blend
   ``background + alpha * (colour - background)`` with ``alpha >= 1/2`` and a small residual. Unmixing
   against the background (rather than taking the nearest palette colour) keeps anti-aliased or blurred
   edges with their object: a red/blue edge pixel is not "purple".
3. Regions: connected foreground pixels whose neighbours differ by less than ``MAX_STEP`` in RGB (so
   touching shapes stay apart). Regions smaller than a fifth of the smallest rendered shape, or thin
   ones (mostly gone after a one-pixel erosion: blended edges), are dropped. A region's colour is the
   palette colour nearest to the median of its interior (eroded) pixels.
4. Kind: the region's soft coverage of its colour (its alpha, including the blurred fringe) is compared
   with each ideal shape of the same area (coverage is conserved by blur) and centroid, blurred by a few
   trial widths; the kind with the least squared error wins. Position is the 3x3 cell of the centroid.

Scoring (``score``): ground-truth objects are matched one-to-one to detections minimising
``4 [colour wrong] + 2 [kind wrong] + [position wrong]`` (an unmatched object costs 7), i.e. by colour,
then kind, then position. ``colour``, ``kind`` and ``position`` are the fractions of ground-truth objects
whose match has that attribute right (unmatched = wrong). ``count`` is the fraction of the scene's
(colour, kind) groups whose number of detections of that colour and kind equals the number asked for.
``scene`` is 1 when every attribute is right and there is no extra detection.
"""

from __future__ import annotations

import io
import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from openldm.shapes.render import (
    BACKGROUNDS,
    COLOURS,
    KINDS,
    PALETTE,
    POSITIONS,
    SIZES,
    Scene,
    shape_coverage,
)

ATTRIBUTES = ("colour", "kind", "position", "count", "scene")
MAX_RESIDUAL = 70.0  # RGB distance from the blend line beyond which a pixel is unexplained
# Area / bounding-box area, and how far the centroid sits below the box centre (in box sides): these
# place the ideal shape of a given area on a region's centroid.
FILL = {"circle": float(np.pi / 4), "square": 1.0, "triangle": 0.5, "rectangle": 0.5, "pillar": 0.5}
DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6, "rectangle": 0.0, "pillar": 0.0}
MIN_AREA = 0.2 * 0.5 * (min(SIZES.values()) / 3) ** 2  # a fifth of a small triangle, as image fraction
MAX_DETECTIONS = 8
FRINGE = 0.1  # coverage below this is noise
MAX_STEP = 60.0  # RGB distance beyond which neighbouring pixels belong to different shapes
INTERIOR = 0.2  # a region is a shape when at least this fraction of it survives a one-pixel erosion
BLURS = (0.0, 0.03, 0.06, 0.1, 0.15)  # blur widths tried when fitting a kind, in units of sqrt(area)
COSTS = {"colour": 4, "kind": 2, "position": 1}


@dataclass(frozen=True)
class Detection:
    kind: str
    colour: str
    position: str
    area: float  # fraction of the image
    centroid: tuple[float, float]  # (x, y) as fractions of width and height
    fit: float  # fraction of its coverage map explained by the ideal shape of its kind


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image as [H, W, 3] values in 0..255, got shape {array.shape}")
    return array


def _palette(names: Sequence[str]) -> np.ndarray:
    return np.asarray([PALETTE[n] for n in names], dtype=np.float32)


def _background(pixels: np.ndarray) -> tuple[str, np.ndarray]:
    flat = pixels[::2, ::2].reshape(-1, 3)  # every fourth pixel is plenty to find the majority colour
    nearest = np.argmin(((flat[:, None, :] - _palette(BACKGROUNDS)[None]) ** 2).sum(-1), axis=1)
    index = int(np.bincount(nearest, minlength=len(BACKGROUNDS)).argmax())
    return BACKGROUNDS[index], np.median(flat[nearest == index], axis=0)


def _unmix(pixels: np.ndarray, background_rgb: np.ndarray, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel as a blend of the background with each of ``names``: the coverage (alpha) of each
    colour, [H, W, C] in [0, 1], and whether the blend explains the pixel (residual small), [H, W, C]."""
    direction = _palette(names) - background_rgb  # [C, 3]
    offset = pixels[:, :, None, :] - background_rgb  # [H, W, 1, 3]
    alpha = np.clip((offset * direction).sum(-1) / (direction**2).sum(-1), 0.0, 1.5)  # [H, W, C]
    residual = np.sqrt(((offset - alpha[..., None] * direction) ** 2).sum(-1))
    return np.minimum(alpha, 1.0).astype(np.float32), residual <= MAX_RESIDUAL


def label_components(
    mask: np.ndarray, links: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, int]:
    """4-connected components of a bool mask: labels (0 = off, 1..n) and n. Pure numpy.

    ``links`` = (down [H-1, W], right [H, W-1]) optionally cuts the connection between neighbours.
    """
    h, w = mask.shape
    down = mask[1:] & mask[:-1]
    right = mask[:, 1:] & mask[:, :-1]
    if links is not None:
        down, right = down & links[0], right & links[1]
    big = h * w + 1
    labels = np.where(mask, np.arange(1, big, dtype=np.int64).reshape(h, w), big)
    while True:
        nxt = labels.copy()
        nxt[1:] = np.minimum(nxt[1:], np.where(down, labels[:-1], big))
        nxt[:-1] = np.minimum(nxt[:-1], np.where(down, labels[1:], big))
        nxt[:, 1:] = np.minimum(nxt[:, 1:], np.where(right, labels[:, :-1], big))
        nxt[:, :-1] = np.minimum(nxt[:, :-1], np.where(right, labels[:, 1:], big))
        if np.array_equal(nxt, labels):
            break
        labels = nxt
    unique, dense = np.unique(labels[mask], return_inverse=True)
    out = np.zeros((h, w), dtype=np.int64)
    out[mask] = dense + 1
    return out, len(unique)


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """[n, n] matrix applying a Gaussian blur of ``sigma`` pixels along one axis (zero outside)."""
    if sigma == 0:
        return np.eye(n, dtype=np.float32)
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    return (np.exp(-0.5 * (d / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))).astype(np.float32)


def _fit_kind(soft: np.ndarray, kinds: Sequence[str] = KINDS) -> tuple[str, float]:
    """The kind whose ideal shape, at the soft map's area and centroid and at the best-fitting blur,
    explains the map best; and the fraction of the map's energy it explains."""
    mass = float(soft.sum())
    ys, xs = np.mgrid[: soft.shape[0], : soft.shape[1]]
    cx, cy = float((soft * xs).sum() / mass) + 0.5, float((soft * ys).sum() / mass) + 0.5
    window = (0, 0, *soft.shape)
    scale = np.sqrt(mass)
    blurs = [(_blur_matrix(soft.shape[0], s * scale), _blur_matrix(soft.shape[1], s * scale)) for s in BLURS]
    best_kind, best_error = kinds[0], np.inf
    for kind in kinds:
        side = float(np.sqrt(mass / FILL[kind]))
        template = shape_coverage(kind, cx, cy - DROP[kind] * side, side, 0, window)
        for rows, cols in blurs:
            error = float(((rows @ template @ cols.T - soft) ** 2).sum())
            if error < best_error:
                best_kind, best_error = kind, error
    return best_kind, 1.0 - best_error / float((soft**2).sum())


def _describe(
    soft: np.ndarray, colour: str, top: int, left: int, size: tuple[int, int], kinds: Sequence[str]
) -> Detection:
    """Kind, position and measures of a component's soft coverage cut out of the image at (top, left)."""
    h, w = size
    kind, fit = _fit_kind(soft, kinds)
    ys, xs = np.mgrid[: soft.shape[0], : soft.shape[1]]
    mass = float(soft.sum())
    cx = float((soft * xs).sum() / mass) + 0.5 + left
    cy = float((soft * ys).sum() / mass) + 0.5 + top
    row, col = min(int(3 * cy / h), 2), min(int(3 * cx / w), 2)
    return Detection(kind, colour, POSITIONS[3 * row + col], mass / (h * w), (cx / w, cy / h), fit)


def dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[[0, -1]] = False
    out[:, [0, -1]] = False
    return out


def _regions(pixels: np.ndarray, foreground: np.ndarray, names: list[str]) -> list[tuple[np.ndarray, str]]:
    """Solid regions and their colours. Neighbouring foreground pixels connect when their colours are
    close, so two touching shapes stay apart. A region's colour is read from its interior (the region
    eroded by a pixel): blended edge pixels (red on yellow blends to orange) neither make a shape of
    their own nor decide a shape's colour."""
    min_pixels = MIN_AREA * pixels.shape[0] * pixels.shape[1]
    down = np.sqrt(((pixels[1:] - pixels[:-1]) ** 2).sum(-1)) <= MAX_STEP
    right = np.sqrt(((pixels[:, 1:] - pixels[:, :-1]) ** 2).sum(-1)) <= MAX_STEP
    labels, count = label_components(foreground, (down, right))
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    regions: list[tuple[np.ndarray, str]] = []
    for label in np.nonzero(areas >= min_pixels)[0]:
        region = labels == label
        interior = _erode(region)
        if label == 0 or interior.sum() < INTERIOR * areas[label]:
            continue
        rgb = np.median(pixels[interior], axis=0)
        regions.append((region, names[int(np.argmin(((_palette(names) - rgb) ** 2).sum(-1)))]))
    return regions


def _soft_region(
    pixels: np.ndarray, region: np.ndarray, others: np.ndarray, colour: str, background_rgb: np.ndarray
) -> tuple[np.ndarray, int, int]:
    """The region's coverage by its colour over a window around it, including the blurred fringe within
    a few pixels but no other region's pixels; and the window's (top, left)."""
    ys, xs = np.nonzero(region)
    reach = max(2, int(0.15 * np.sqrt(len(xs))))
    margin = reach + max(3, int(0.5 * np.sqrt(len(xs))))  # room for the largest template and its blur
    top, left = max(ys.min() - margin, 0), max(xs.min() - margin, 0)
    cut = (slice(top, ys.max() + 1 + margin), slice(left, xs.max() + 1 + margin))
    alpha, explained = _unmix(pixels[cut], background_rgb, [colour])
    soft = np.where(dilate(region[cut], reach) & ~others[cut] & explained[..., 0], alpha[..., 0], 0.0)
    return np.where(soft >= FRINGE, soft, 0.0).astype(np.float32), top, left


def detect_objects(image: Image.Image | np.ndarray, kinds: Sequence[str] = KINDS) -> list[Detection]:
    """The shapes in an RGB image (PIL, or [H, W, 3] in 0..255), largest first; each is given the best
    fitting of ``kinds`` (the dataset's; pass ``ALL_KINDS`` to tell the new kinds too)."""
    pixels = _as_array(image)
    background, background_rgb = _background(pixels)
    names = [c for c in COLOURS if c != background]
    # Foreground: some colour explains the pixel as at least half covering the background. Which colour
    # is decided per region later: with a colour cast, orange on yellow also reads as half-covering red.
    alpha, explained = _unmix(pixels, background_rgb, names)
    regions = _regions(pixels, ((alpha >= 0.5) & explained).any(-1), names)
    taken = np.zeros(pixels.shape[:2], dtype=bool)
    for region, _ in regions:
        taken |= region
    detections = []
    for region, colour in regions:
        soft, top, left = _soft_region(pixels, region, taken & ~region, colour, background_rgb)
        if not soft.any():  # no pixel of the region reads as its own colour over the background
            continue
        detections.append(_describe(soft, colour, top, left, region.shape, kinds))
    return sorted(detections, key=lambda d: -d.area)


def _cost(obj, det: Detection | None) -> int:
    if det is None:
        return sum(COSTS.values())
    return sum(cost for attr, cost in COSTS.items() if getattr(obj, attr) != getattr(det, attr))


def match(scene: Scene, detections: Sequence[Detection]) -> list[Detection | None]:
    """The detection matched to each ground-truth object (None when unmatched), by minimal total cost."""
    candidates: list[Detection | None] = list(detections[:MAX_DETECTIONS]) + [None] * len(scene.objects)
    best, best_cost = None, None
    for chosen in itertools.permutations(range(len(candidates)), len(scene.objects)):
        cost = sum(_cost(o, candidates[c]) for o, c in zip(scene.objects, chosen, strict=True))
        if best_cost is None or cost < best_cost:
            best, best_cost = chosen, cost
    return [candidates[c] for c in best]


def score(scene: Scene, detections: Sequence[Detection]) -> dict[str, float]:
    """Attribute accuracies of one image (see the module docstring), plus ``objects`` and ``groups``."""
    matched = match(scene, detections)
    result: dict[str, float] = {}
    for attr in ("colour", "kind", "position"):
        right = [
            d is not None and getattr(d, attr) == getattr(o, attr)
            for o, d in zip(scene.objects, matched, strict=True)
        ]
        result[attr] = sum(right) / len(right)
    wanted = Counter((o.colour, o.kind) for o in scene.objects)
    found = Counter((d.colour, d.kind) for d in detections)
    result["count"] = sum(found[key] == n for key, n in wanted.items()) / len(wanted)
    all_right = all(result[a] == 1.0 for a in ("colour", "kind", "position", "count"))
    result["scene"] = float(all_right and len(detections) == len(scene.objects))
    result["objects"], result["groups"] = float(len(scene.objects)), float(len(wanted))
    return result


def evaluate(
    images: Sequence[Image.Image | np.ndarray], scenes: Sequence[Scene], kinds: Sequence[str] = KINDS
) -> dict[str, float]:
    """Accuracies over a set of images: colour, kind and position per object, count per (colour, kind)
    group, scene per image; each a fraction in [0, 1]; plus ``images`` (how many). Kinds are told
    among ``kinds``."""
    if len(images) != len(scenes):
        raise ValueError(f"got {len(images)} images for {len(scenes)} scenes; pass one scene per image")
    if not scenes:
        raise ValueError("nothing to evaluate: pass at least one image and its scene")
    scores = [score(s, detect_objects(im, kinds)) for im, s in zip(images, scenes, strict=True)]
    objects = sum(s["objects"] for s in scores)
    groups = sum(s["groups"] for s in scores)
    result = {a: sum(s[a] * s["objects"] for s in scores) / objects for a in ("colour", "kind", "position")}
    result["count"] = sum(s["count"] * s["groups"] for s in scores) / groups
    result["scene"] = sum(s["scene"] for s in scores) / len(scores)
    result["images"] = float(len(scores))
    return result


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per named result of ``evaluate``, accuracies in percent."""
    lines = ["| set | images | " + " | ".join(ATTRIBUTES) + " |", "|---" * (len(ATTRIBUTES) + 2) + "|"]
    for name, r in rows.items():
        cells = " | ".join(f"{100 * r[a]:.1f}" for a in ATTRIBUTES)
        lines.append(f"| {name} | {int(r['images'])} | {cells} |")
    return "\n".join(lines)


def fidelity(
    generate: Callable[[list[str]], Sequence[Image.Image]],
    n: int,
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Generate images for seen and held-out evaluation captions and evaluate them.

    ``generate`` maps a list of captions to one image each (e.g. a txt2img pipeline at fixed steps,
    guidance and seed). Returns ``{"seen": evaluate(...), "held-out": evaluate(...)}``.
    """
    from openldm.shapes.dataset import evaluation_scenes

    rows = {}
    for name, held_out_only in (("seen", False), ("held-out", True)):
        pairs = evaluation_scenes(seed, n, held_out_only=held_out_only)
        images: list[Image.Image] = []
        for start in range(0, n, batch_size):
            batch = [caption for caption, _ in pairs[start : start + batch_size]]
            images.extend(generate(batch))
        rows[name] = evaluate(images, [scene for _, scene in pairs])
    return rows


def degrade(image: Image.Image, rng: np.random.Generator, strength: float = 1.0) -> Image.Image:
    """Imitate a generated image's flaws: colour cast, blur, noise and JPEG artefacts (validation only)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    gain = rng.uniform(1 - 0.1 * strength, 1 + 0.1 * strength, size=3)
    shift = rng.uniform(-15 * strength, 15 * strength, size=3)
    array = array * gain + shift
    blurred = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.9)) * strength * image.width / 64)
    )
    array = np.asarray(blurred, dtype=np.float32) + rng.normal(0, 8 * strength, size=array.shape)
    buffer = io.BytesIO()
    # Full-resolution chroma: 4:2:0 subsampling would halve colour resolution, which no generator does.
    quality = int(95 - 20 * strength)
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(
        buffer, "JPEG", quality=quality, subsampling=0
    )
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
