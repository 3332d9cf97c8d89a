"""The procedural shapes dataset (render, captions, dataset) and its prompt-fidelity evaluator."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from openldm.shapes.captions import (
    COLOUR_WORDS,
    KIND_WORDS,
    caption,
    explicit_caption,
    omit_attribute,
    relation,
)
from openldm.shapes.dataset import (
    DENSE_COUNTS,
    HELD_OUT,
    OFF_PALETTE_DISTANCE,
    ShapesDataset,
    evaluation_scenes,
    off_palette_colour,
    sample_scene,
    to_tensor,
)
from openldm.shapes.evaluate import degrade, detect_objects, evaluate, format_table, score
from openldm.shapes.render import PALETTE, Scene, ShapeObject, render
from openldm.shapes.variant_fidelity import depth_cases, inpaint_cases, score_depth, score_inpaint

SIZE_ORDER = ("small", "medium", "large")


def _mentions(text: str, obj: ShapeObject) -> bool:
    colour = any(word in text for word in COLOUR_WORDS[obj.colour])
    kind = any(word in text for pair in KIND_WORDS[obj.kind] for word in pair)
    return colour and kind


def test_same_seed_and_index_give_the_same_sample_in_any_order():
    a, b = ShapesDataset(seed=3), ShapesDataset(seed=3)
    forward = [a[i] for i in range(6)]
    backward = [b[i] for i in reversed(range(6))][::-1]
    for x, y in zip(forward, backward, strict=True):
        assert x.caption == y.caption and x.scene == y.scene
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
        assert np.array_equal(x.depth, y.depth)
    other = ShapesDataset(seed=4)
    assert [other[i].scene for i in range(6)] != [s.scene for s in forward]


def test_held_out_pairs_never_appear_in_training_samples():
    data = ShapesDataset(seed=0, length=250)
    pairs = {(o.colour, o.kind) for i in range(len(data)) for o in data[i].scene.objects}
    assert not pairs & HELD_OUT
    assert len(pairs) >= 20  # every other pair shows up
    held = evaluation_scenes(seed=0, n=10, held_out_only=True)
    assert all((s.objects[0].colour, s.objects[0].kind) in HELD_OUT for _, s in held)
    assert {(s.objects[0].colour, s.objects[0].kind) for _, s in held} == HELD_OUT
    seen = evaluation_scenes(seed=0, n=20, held_out_only=False)
    assert not {(o.colour, o.kind) for _, s in seen for o in s.objects} & HELD_OUT


def test_captions_name_every_object_and_are_deterministic():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng, HELD_OUT)
        text = caption(scene, np.random.default_rng(7))
        assert text == caption(scene, np.random.default_rng(7))
        assert all(_mentions(text, o) for o in scene.objects), text
        assert all(_mentions(explicit_caption(scene), o) for o in scene.objects)


def test_omit_attribute_leaves_the_colour_or_the_kind_unsaid():
    phrase = "an orange circle in the top left corner"
    assert omit_attribute(phrase, "colour") == "a circle in the top left corner"
    assert omit_attribute(phrase, "kind") == "an orange shape in the top left corner"
    assert omit_attribute("two small azure boxes above ", "kind") == "two small azure shapes above "
    assert omit_attribute("a emerald disc", "colour") == "a disc"
    with pytest.raises(ValueError, match="states no colour"):
        omit_attribute("a circle", "colour")


def test_explicit_caption_counts_and_relations():
    def obj(colour, kind, position):
        return ShapeObject(kind=kind, colour=colour, size="medium", position=position)

    two = Scene("white", (obj("green", "triangle", "top left"), obj("green", "triangle", "bottom")))
    assert (
        explicit_caption(two)
        == "two green triangles in the top left corner and at the bottom on a white background"
    )
    red, blue = obj("red", "circle", "top"), obj("blue", "square", "centre")
    assert relation(red, blue) == "above" and relation(blue, red) == "below"
    assert relation(obj("red", "circle", "left"), blue) == "to the left of"
    one = Scene("blue", (obj("orange", "circle", "centre"),))
    assert explicit_caption(one) == "an orange circle in the centre on a blue background"
    with pytest.raises(ValueError, match="background colour"):
        Scene("red", (obj("red", "circle", "top"),))


def _grow(mask: np.ndarray) -> np.ndarray:
    """The mask and its 8 neighbours."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.stack([padded[i : i + h, j : j + w] for i in range(3) for j in range(3)]).any(0)


def test_masks_have_the_object_colour_and_depth_is_ordered():
    data = ShapesDataset(seed=1, size=64)
    for i in range(20):
        sample = data[i]
        pixels = np.asarray(sample.image, dtype=np.float32)
        background = np.asarray(PALETTE[sample.scene.background], dtype=np.float32)
        assert sample.masks.shape == (len(sample.scene.objects), 64, 64) and sample.depth.shape == (64, 64)
        assert not (sample.masks.sum(0) > 1).any()  # no overlap
        for obj, mask in zip(sample.scene.objects, sample.masks, strict=True):
            colour = np.asarray(PALETTE[obj.colour], dtype=np.float32)
            inside = pixels[mask]
            assert mask.sum() > 20
            # Every mask pixel is at least half the object's colour; most are exactly it.
            assert (np.abs(inside - colour).sum(-1) <= np.abs(inside - background).sum(-1) + 1).all()
            assert (np.abs(inside - colour).max(-1) == 0).mean() > 0.5
            assert np.allclose(np.median(sample.depth[mask]), obj.depth, atol=1e-6)
        # Away from the shapes' anti-aliased edges (a pixel outside a mask may be up to half covered),
        # the floor is farther than every shape.
        untouched = ~np.stack([_grow(m) for m in sample.masks]).any(0)
        assert sample.depth[untouched].max() < min(o.depth for o in sample.scene.objects)
        # Larger shapes stand nearer (larger = nearer, MiDaS convention).
        order = sorted(sample.scene.objects, key=lambda o: o.depth)
        sizes = [SIZE_ORDER.index(o.size) for o in order]
        assert sizes == sorted(sizes)


def test_recoloured_samples_use_off_palette_paints_only():
    plain = ShapesDataset(seed=2, length=40, dense_fraction=0.5)
    mixed = ShapesDataset(seed=2, length=40, dense_fraction=0.5, recolour_fraction=0.5)
    palette = np.asarray(list(PALETTE.values()), dtype=np.float64)
    recoloured = 0
    for i in range(len(mixed)):
        a, b = plain[i], mixed[i]
        assert a.scene == b.scene  # the same scenes; only the paints may differ
        if np.array_equal(np.asarray(a.image), np.asarray(b.image)):
            continue
        recoloured += 1
        assert b.caption == ""  # a recoloured image has no caption: its colours have no names
        pixels = np.asarray(b.image).reshape(-1, 3).astype(np.float64)
        inside = b.masks.reshape(len(b.masks), -1)
        for mask in inside:  # every object's fully covered pixels are far from every palette colour
            colours = np.unique(pixels[mask], axis=0)
            distances = np.sqrt(((colours[:, None] - palette[None]) ** 2).sum(-1)).min(1)
            assert distances.max() >= OFF_PALETTE_DISTANCE
    assert 10 <= recoloured <= 30
    rng = np.random.default_rng(0)
    names = list(PALETTE)
    nearest = set()
    for _ in range(300):
        colour = np.asarray(off_palette_colour(rng, "circle", HELD_OUT), dtype=np.float64)
        distances = np.sqrt(((palette - colour) ** 2).sum(1))
        assert distances.min() >= OFF_PALETTE_DISTANCE
        nearest.add(names[int(distances.argmin())])
    # ("yellow", "circle") is held out: no painted circle is nearest to yellow; every other colour occurs
    assert nearest == set(PALETTE) - {"yellow"}
    with pytest.raises(ValueError, match="recolour_fraction"):
        ShapesDataset(seed=0, recolour_fraction=1.5)


def test_render_paints_objects_in_given_colours():
    scene = Scene(background="white", objects=(ShapeObject("square", "red", "large", "centre"),))
    image = np.asarray(render(scene, 48, colours=[(1, 2, 3)]).image)
    assert tuple(image[24, 24]) == (1, 2, 3) and tuple(image[0, 0]) == PALETTE["white"]
    with pytest.raises(ValueError, match="2 colours given for a scene of 1 objects"):
        render(scene, 48, colours=[(1, 2, 3), (4, 5, 6)])


def test_to_tensor_range_and_layout():
    sample = ShapesDataset(seed=0, size=32)[0]
    tensor = to_tensor(sample.image)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert -1.0 <= tensor.min() and tensor.max() <= 1.0
    colour = torch.tensor(PALETTE[sample.scene.background], dtype=torch.float32) / 127.5 - 1
    assert torch.allclose(tensor[:, 0, 0], colour) or sample.masks[:, 0, 0].any()


@pytest.mark.parametrize("size", [64, 128])
def test_detector_is_at_least_99_percent_on_ground_truth(size):
    data = ShapesDataset(seed=11, size=size)
    samples = [data[i] for i in range(150 if size == 64 else 30)]
    result = evaluate([s.image for s in samples], [s.scene for s in samples])
    for attribute in ("colour", "kind", "position", "count"):
        assert result[attribute] >= 0.99, (attribute, result)


def test_detector_is_robust_to_degraded_images():
    data = ShapesDataset(seed=12, size=64)
    rng = np.random.default_rng(0)
    samples = [data[i] for i in range(80)]
    images = [degrade(s.image, rng) for s in samples]
    result = evaluate(images, [s.scene for s in samples])
    for attribute in ("colour", "kind", "position", "count"):
        assert result[attribute] >= 0.97, (attribute, result)


def test_score_penalises_wrong_attributes():
    scene = Scene("white", (ShapeObject("circle", "red", "large", "top left"),))
    detections = detect_objects(render(scene, 64).image)
    assert [(d.kind, d.colour, d.position) for d in detections] == [("circle", "red", "top left")]
    assert score(scene, detections)["scene"] == 1.0
    wrong = Scene("white", (ShapeObject("square", "blue", "large", "bottom"),))
    result = score(wrong, detections)
    assert result["colour"] == result["kind"] == result["position"] == result["count"] == 0.0
    twice = Scene("white", (scene.objects[0], ShapeObject("circle", "red", "small", "centre")))
    assert score(twice, detections)["count"] == 0.0
    assert score(scene, [])["colour"] == 0.0
    table = format_table({"seen": evaluate([render(scene, 64).image], [scene])})
    assert "| seen | 1 | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 |" in table


def test_detect_objects_skips_a_region_its_own_colour_does_not_explain():
    """A blurry decoder output (green smudges on cyan, from an undertrained autoencoder) holds a region
    whose colour explains none of its pixels over the background: it is no object, and no crash."""
    from pathlib import Path

    from PIL import Image

    image = Image.open(Path(__file__).parent / "data" / "evaluator_empty_region.png")
    detections = detect_objects(image)
    assert all(d.area > 0 for d in detections)
    assert all(np.isfinite(d.centroid).all() for d in detections)


def test_dense_scenes_fill_the_grid_and_avoid_held_out_pairs():
    dataset = ShapesDataset(seed=3, length=400, dense_fraction=0.5)
    dense = [dataset[i] for i in range(400) if dataset[i].caption == ""]
    assert 150 <= len(dense) <= 250  # half of them, give or take the draw
    for sample in dense:
        assert DENSE_COUNTS[0] <= len(sample.scene.objects) <= DENSE_COUNTS[1]
        assert not {(o.colour, o.kind) for o in sample.scene.objects} & HELD_OUT
    plain = ShapesDataset(seed=3, length=400)
    assert plain[7].caption == ShapesDataset(seed=3, length=400, dense_fraction=0.0)[7].caption
    with pytest.raises(ValueError, match="dense_fraction"):
        ShapesDataset(seed=0, dense_fraction=1.5)


def test_inpaint_fidelity_of_ground_truth_and_of_doing_nothing():
    cases = inpaint_cases(seed=0, n=24, size=64)
    assert all(np.asarray(c.mask).any() for c in cases)
    perfect = score_inpaint([render(c.scene, 64).image for c in cases], cases)
    assert perfect["kept_error"] == 0.0
    assert perfect["repainted"] >= 0.95 and perfect["kept_shapes"] >= 0.95
    untouched = score_inpaint([c.init for c in cases], cases)  # the init image: nothing repainted
    assert untouched["kept_error"] == 0.0 and untouched["repainted"] == 0.0
    assert untouched["kept_shapes"] >= 0.95


def test_depth_order_of_ground_truth_and_of_swapped_sizes():
    cases = depth_cases(seed=0, n=40, size=64)
    scenes = [s for _, s, _ in cases]
    perfect = score_depth([render(s, 64).image for s in scenes], scenes)
    assert perfect["pairs"] >= 10 and perfect["order"] >= 0.95 and perfect["order_found"] >= 0.95
    swap = {"small": "large", "large": "small", "medium": "medium"}

    def swapped(scene: Scene) -> Scene:
        objects = [dataclasses.replace(o, size=swap[o.size], offset=(0.0, 0.0)) for o in scene.objects]
        return Scene(scene.background, tuple(objects))

    reversed_sizes = score_depth([render(swapped(s), 64).image for s in scenes], scenes)
    assert reversed_sizes["order"] <= 0.05 and reversed_sizes["order_found"] <= 0.05


def test_depth_order_apart_from_the_detection():
    """A missing shape breaks its pairs in ``order`` but leaves ``order_found`` to the pairs found."""
    cases = depth_cases(seed=0, n=40, size=64)
    scenes = [s for _, s, _ in cases]
    without_last = [Scene(s.background, s.objects[:-1]) if len(s.objects) == 3 else s for s in scenes]
    scores = score_depth([render(s, 64).image for s in without_last], scenes)
    assert scores["found_pairs"] < scores["pairs"]
    assert scores["order"] == pytest.approx(scores["found_pairs"] / scores["pairs"] * scores["order_found"])
    assert scores["order_found"] >= 0.95 and scores["order"] < 0.9


def test_canonical_fraction_swaps_captions_only():
    plain = ShapesDataset(seed=4, size=32, length=400)
    canonical = ShapesDataset(seed=4, size=32, length=400, canonical_fraction=0.5)
    swapped = 0
    for i in range(400):
        a, b = plain[i], canonical[i]
        assert a.scene == b.scene and np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert b.caption in (a.caption, explicit_caption(b.scene))
        swapped += b.caption != a.caption
    assert 160 < swapped < 240  # about half (a varied caption may equal the canonical one)
    everything = ShapesDataset(seed=4, size=32, length=10, canonical_fraction=1.0)
    assert all(everything[i].caption == explicit_caption(everything[i].scene) for i in range(10))
    with pytest.raises(ValueError, match="canonical_fraction"):
        ShapesDataset(seed=4, canonical_fraction=1.5)


def test_the_new_kind_is_drawn_captioned_and_told_apart_only_when_asked() -> None:
    from openldm.shapes.render import ALL_KINDS, NEW_KINDS

    scene = Scene(
        "white",
        (
            ShapeObject("pillar", "red", "large", "top left"),
            ShapeObject("rectangle", "blue", "large", "centre"),
        ),
    )
    image = render(scene, 64).image
    assert explicit_caption(scene).startswith("a red pillar in the top left corner and a blue rectangle")
    told = {d.colour: d.kind for d in detect_objects(image, ALL_KINDS)}
    assert told == {"red": "pillar", "blue": "rectangle"}
    assert "pillar" not in {d.kind for d in detect_objects(image)}  # the dataset's kinds only
    assert NEW_KINDS == ("pillar",) and not set(NEW_KINDS) & set(KIND_WORDS)
