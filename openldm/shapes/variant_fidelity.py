"""Fidelity of the inpainting and depth variants on the shapes task.

Inpainting: a scene's first shape is taken out of the picture (the init image is the scene without it)
and a mask covers where it stood, grown by ``MASK_GROWTH`` pixels; the prompt is the whole scene's
caption. Scored: the kept region (mean absolute difference from the scene outside the mask, 0..255,
without pasting the kept pixels back), the repainted shape (its colour, kind and position, by the
detector of :mod:`openldm.shapes.evaluate`) and the kept shapes (still found with all three right).

Depth: the model draws a scene from its ground-truth depth map and caption (from pure noise: the depth
map is its only view of the scene). Scored: the usual attributes, and the depth order: in this dataset a
shape of a larger size class stands nearer, so for every pair of shapes of different sizes the drawn
nearer one should be the larger (by its bounding box side: the area over the kind's fill ratio).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from openldm.shapes.dataset import evaluation_scenes
from openldm.shapes.evaluate import FILL, Detection, detect_objects, dilate, evaluate, match
from openldm.shapes.render import PALETTE, Scene, render

MASK_GROWTH = 3  # pixels added around the repainted shape's mask


@dataclass(frozen=True)
class InpaintCase:
    caption: str
    scene: Scene  # the scene the caption describes; object 0 is the one to repaint
    init: Image.Image  # the scene without object 0
    mask: Image.Image  # "L", 255 where the model repaints


def _without_first(scene: Scene, size: int) -> Image.Image:
    if len(scene.objects) == 1:
        return Image.new("RGB", (size, size), PALETTE[scene.background])
    return render(Scene(scene.background, scene.objects[1:]), size).image


def inpaint_cases(seed: int, n: int, size: int) -> list[InpaintCase]:
    """``n`` cases from the seen evaluation scenes (:func:`openldm.shapes.dataset.evaluation_scenes`)."""
    cases = []
    for caption, scene in evaluation_scenes(seed, n, held_out_only=False):
        mask = dilate(render(scene, size).masks[0], MASK_GROWTH)
        image = Image.fromarray((mask * 255).astype(np.uint8), "L")
        cases.append(InpaintCase(caption, scene, _without_first(scene, size), image))
    return cases


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _all_right(obj: object, detection: object) -> bool:
    return detection is not None and all(
        getattr(detection, a) == getattr(obj, a) for a in ("colour", "kind", "position")
    )


def score_inpaint(outputs: Sequence[Image.Image], cases: Sequence[InpaintCase]) -> dict[str, float]:
    """``kept_error`` (0..255), and fractions: the repainted shape's ``colour``, ``kind``, ``position``,
    ``repainted`` (all three right), and ``kept_shapes`` (the other shapes still found, all right)."""
    if len(outputs) != len(cases) or not cases:
        raise ValueError(f"got {len(outputs)} images for {len(cases)} cases; pass one image per case")
    errors, kept, kept_total = [], 0, 0
    right = {"colour": 0, "kind": 0, "position": 0, "repainted": 0}
    for output, case in zip(outputs, cases, strict=True):
        outside = np.asarray(case.mask) < 128
        target = _pixels(render(case.scene, output.size[0]).image)
        errors.append(float(np.abs(_pixels(output) - target)[outside].mean()))
        matched = match(case.scene, detect_objects(output))
        first, found = case.scene.objects[0], matched[0]
        for attr in ("colour", "kind", "position"):
            right[attr] += found is not None and getattr(found, attr) == getattr(first, attr)
        right["repainted"] += _all_right(first, found)
        kept += sum(_all_right(o, d) for o, d in zip(case.scene.objects[1:], matched[1:], strict=True))
        kept_total += len(case.scene.objects) - 1
    result = {k: v / len(cases) for k, v in right.items()}
    result["kept_shapes"] = kept / kept_total if kept_total else 1.0
    result["kept_error"] = float(np.mean(errors))
    result["images"] = float(len(cases))
    return result


def depth_cases(seed: int, n: int, size: int) -> list[tuple[str, Scene, np.ndarray]]:
    """(caption, scene, depth map) of the seen evaluation scenes; the depth map in the MiDaS convention."""
    return [(c, s, render(s, size).depth) for c, s in evaluation_scenes(seed, n, held_out_only=False)]


def _side(detection: Detection) -> float:
    return float(np.sqrt(detection.area / FILL[detection.kind]))


def score_depth(outputs: Sequence[Image.Image], scenes: Sequence[Scene]) -> dict[str, float]:
    """:func:`openldm.shapes.evaluate.evaluate`'s accuracies plus ``order``: over pairs of shapes of
    different size classes (hence depths), the fraction drawn with the nearer one larger (an undetected
    shape breaks its pairs); ``pairs`` counts them. ``order_found``: the same fraction over the pairs
    whose two shapes were both found (``found_pairs``), the ordering apart from the detection."""
    result = evaluate(outputs, scenes)
    ordered, pairs, found = 0, 0, 0
    for output, scene in zip(outputs, scenes, strict=True):
        matched = match(scene, detect_objects(output))
        for (a, da), (b, db) in itertools.combinations(zip(scene.objects, matched, strict=True), 2):
            if a.size == b.size:
                continue
            pairs += 1
            if da is not None and db is not None:
                found += 1
                ordered += (_side(da) > _side(db)) == (a.depth > b.depth)
    result["order"] = ordered / pairs if pairs else 1.0
    result["pairs"] = float(pairs)
    result["order_found"] = ordered / found if found else 1.0
    result["found_pairs"] = float(found)
    return result
