"""Hard cases of prompt fidelity that the main evaluation does not isolate, each a set of prompts.

* ``one shape, no position``: "a red circle on a blue background" (the main sets always name the cell;
  a model may draw the shape twice when the prompt leaves the cell open).
* ``three of a kind``: "three red circles on a blue background": the count of one group, no positions.
* ``held-out pair in two``: "a blue triangle above a yellow circle on a white background": a held-out
  colour-kind pair beside a seen one, placed by a relation (the main held-out set has one shape alone).

Every image is scored on what it should hold, as (colour, kind) pairs with their counts: ``objects``,
the fraction of asked shapes found (one-to-one); ``exact``, the fraction of images holding exactly the
asked shapes and nothing else; ``held-out``, the fraction of images where the held-out pair is found
(the third case only). Positions are not scored: the prompts leave them open or relative.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

import numpy as np
from PIL import Image

from openldm.shapes.captions import KIND_WORDS, NUMBERS, relation
from openldm.shapes.dataset import EVAL_STREAM, HELD_OUT, allowed_pairs, sample_scene
from openldm.shapes.evaluate import detect_objects
from openldm.shapes.render import Scene, ShapeObject

CASES = ("one shape, no position", "three of a kind", "held-out pair in two")
CASE_STREAM = 7  # the cases' scenes come from a generator stream of their own
Pair = tuple[str, str]


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _background(scene: Scene) -> str:
    return " on " + _a(f"{scene.background} background")


def _noun(obj: ShapeObject) -> str:
    return _a(f"{obj.colour} {KIND_WORDS[obj.kind][0][0]}")


def _one_shape(rng: np.random.Generator) -> tuple[str, Scene]:
    scene = sample_scene(rng, HELD_OUT, count=1)
    return _noun(scene.objects[0]) + _background(scene), scene


def _three_of_a_kind(rng: np.random.Generator) -> tuple[str, Scene]:
    base = sample_scene(rng, HELD_OUT, count=3)  # cells, sizes and jitter as in training
    pairs = allowed_pairs(base.background, HELD_OUT)
    colour, kind = pairs[int(rng.integers(len(pairs)))]
    objects = tuple(dataclasses.replace(o, colour=colour, kind=kind) for o in base.objects)
    scene = Scene(background=base.background, objects=objects)
    caption = f"{NUMBERS[3]} {colour} {KIND_WORDS[kind][0][1]}" + _background(scene)
    return caption, scene


def _held_out_in_two(rng: np.random.Generator, index: int) -> tuple[str, Scene]:
    ordered = sorted(HELD_OUT)
    held = ordered[index % len(ordered)]
    scene = sample_scene(rng, HELD_OUT, first=held, count=2)
    while (scene.objects[1].colour, scene.objects[1].kind) == held:  # the other shape is a seen pair
        scene = sample_scene(rng, HELD_OUT, first=held, count=2)
    first, second = scene.objects if rng.random() < 0.5 else scene.objects[::-1]
    caption = f"{_noun(first)} {relation(first, second)} {_noun(second)}" + _background(scene)
    return caption, scene


def case_scenes(case: str, seed: int, n: int) -> list[tuple[str, Scene]]:
    """``n`` (caption, scene) pairs of ``case``; the same for the same seed."""
    if case not in CASES:
        raise ValueError(f"unknown case {case!r}; known cases: {', '.join(CASES)}")
    result = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, EVAL_STREAM, CASE_STREAM, CASES.index(case)])
        if case == CASES[0]:
            result.append(_one_shape(rng))
        elif case == CASES[1]:
            result.append(_three_of_a_kind(rng))
        else:
            result.append(_held_out_in_two(rng, i))
    return result


def _held_out_pair(scene: Scene) -> Pair | None:
    return next(((o.colour, o.kind) for o in scene.objects if (o.colour, o.kind) in HELD_OUT), None)


def score_cases(images: Sequence[Image.Image | np.ndarray], scenes: Sequence[Scene]) -> dict[str, float]:
    """``objects``, ``exact`` and (when the scenes hold a held-out pair) ``held-out``, as fractions;
    plus ``images``."""
    if len(images) != len(scenes) or not scenes:
        raise ValueError(f"got {len(images)} images for {len(scenes)} scenes; pass one scene per image")
    asked = found = exact = with_held = held_found = 0
    for image, scene in zip(images, scenes, strict=True):
        wanted = Counter((o.colour, o.kind) for o in scene.objects)
        detected = Counter((d.colour, d.kind) for d in detect_objects(image))
        asked += sum(wanted.values())
        found += sum((wanted & detected).values())
        exact += wanted == detected
        held = _held_out_pair(scene)
        if held is not None:
            with_held += 1
            held_found += detected[held] > 0
    result = {"objects": found / asked, "exact": exact / len(scenes), "images": float(len(scenes))}
    if with_held:
        result["held-out"] = held_found / with_held
    return result
