"""Captions for shape scenes: varied templates and synonyms, deterministic given a numpy Generator.

Every caption names each object's colour and kind (possibly through a synonym, and through a count when
the same coloured kind repeats). Positions are said absolutely ("in the top left corner") or through
relations derived from the grid ("above", "below", "to the left of", "to the right of").
``explicit_caption`` is the single canonical form used for evaluation: it states every scored attribute.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from openldm.shapes.render import Scene, ShapeObject, cell_of

# The first word is the canonical one; it is also the one used most often in training captions.
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "orange": ("orange", "tangerine"),
    "yellow": ("yellow", "golden", "lemon"),
    "green": ("green", "emerald"),
    "cyan": ("cyan", "turquoise", "aqua"),
    "blue": ("blue", "azure", "cobalt"),
    "purple": ("purple", "violet"),
    "pink": ("pink", "rose"),
    "white": ("white",),
    "black": ("black",),
}
KIND_WORDS: dict[str, tuple[tuple[str, str], ...]] = {  # (singular, plural)
    "circle": (("circle", "circles"), ("disc", "discs"), ("dot", "dots")),
    "square": (("square", "squares"), ("box", "boxes")),
    "triangle": (("triangle", "triangles"),),
    "rectangle": (("rectangle", "rectangles"), ("bar", "bars")),
}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "at the top left", "in the upper left"),
    "top": ("at the top", "at the top centre", "along the top edge"),
    "top right": ("in the top right corner", "at the top right", "in the upper right"),
    "left": ("on the left", "at the left side", "on the left edge"),
    "centre": ("in the centre", "in the middle", "at the center"),
    "right": ("on the right", "at the right side", "on the right edge"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left"),
    "bottom": ("at the bottom", "at the bottom centre", "along the bottom edge"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right"),
}
# The words of the kinds the dataset never shows (render.NEW_KINDS): captions of new concepts only.
NEW_KIND_WORDS: dict[str, tuple[tuple[str, str], ...]] = {"pillar": (("pillar", "pillars"),)}
COLOUR_VOCABULARY = frozenset(word for words in COLOUR_WORDS.values() for word in words)
KIND_VOCABULARY = frozenset(word for forms in KIND_WORDS.values() for pair in forms for word in pair)
PLURAL_KINDS = frozenset(plural for forms in KIND_WORDS.values() for _, plural in forms)
GENERIC_KIND = ("shape", "shapes")  # the word that stands for a kind an object phrase leaves unsaid
NUMBERS = ("no", "one", "two", "three")
PREFIXES = ("", "", "", "a picture of ", "an image of ", "a drawing of ", "a simple illustration of ")
BACKGROUND_TEMPLATES = (" on {} background", " on {} background", " against {} backdrop", " on {}")
SYNONYM_RATE = 0.3  # how often a synonym replaces the canonical word


def _pick(rng: np.random.Generator, options: tuple, canonical_first: bool = True) -> object:
    if canonical_first and (len(options) == 1 or rng.random() >= SYNONYM_RATE):
        return options[0]
    return options[int(rng.integers(len(options)))]


def _colour(colour: str, rng: np.random.Generator | None) -> str:
    return COLOUR_WORDS[colour][0] if rng is None else str(_pick(rng, COLOUR_WORDS[colour]))


def _kind(kind: str, count: int, rng: np.random.Generator | None) -> str:
    forms = KIND_WORDS[kind] if kind in KIND_WORDS else NEW_KIND_WORDS[kind]
    words = forms[0] if rng is None else _pick(rng, forms)
    return words[0] if count == 1 else words[1]


def _position(position: str, rng: np.random.Generator | None) -> str:
    return (
        POSITION_PHRASES[position][0] if rng is None else str(_pick(rng, POSITION_PHRASES[position], False))
    )


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(obj: ShapeObject, rng: np.random.Generator | None, with_size: bool = False) -> str:
    size = f"{obj.size} " if with_size and obj.size != "medium" else ""
    return _a(f"{size}{_colour(obj.colour, rng)} {_kind(obj.kind, 1, rng)}")


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# A caption as spans: (text, indices of the scene objects the text describes); joining the texts gives
# the caption. Prefixes, separators and the background describe no object.
Spans = list[tuple[str, tuple[int, ...]]]


def joined(spans: Spans) -> str:
    """The caption that ``spans`` make."""
    return "".join(text for text, _ in spans)


def _join_spans(parts: Spans) -> Spans:
    spans: Spans = []
    for i, part in enumerate(parts):
        if i:
            spans.append((" and " if i == len(parts) - 1 else ", ", ()))
        spans.append(part)
    return spans


def relation(a: ShapeObject, b: ShapeObject) -> str:
    """The grid relation of ``a`` to ``b``: vertical when their rows differ, else horizontal."""
    (ra, ca), (rb, cb) = cell_of(a.position), cell_of(b.position)
    if ra != rb:
        return "above" if ra < rb else "below"
    return "to the left of" if ca < cb else "to the right of"


def _groups(scene: Scene) -> list[list[int]]:
    """Indices of the objects grouped by (colour, kind), in order of first appearance."""
    keys = [(o.colour, o.kind) for o in scene.objects]
    return [[i for i, k in enumerate(keys) if k == key] for key in Counter(keys)]


def _background(scene: Scene, rng: np.random.Generator) -> str:
    template = str(_pick(rng, BACKGROUND_TEMPLATES, False))
    word = _colour(scene.background, rng)
    return template.format(word if template == " on {}" else _a(word))


def _listing(scene: Scene, rng: np.random.Generator, with_positions: bool) -> Spans:
    parts: Spans = []
    for group in _groups(scene):
        first = scene.objects[group[0]]
        if len(group) == 1:
            text = _noun(first, rng, with_size=rng.random() < 0.2)
            if with_positions:
                text += " " + _position(first.position, rng)
        else:
            text = f"{NUMBERS[len(group)]} {_colour(first.colour, rng)} {_kind(first.kind, len(group), rng)}"
            if with_positions:
                text += " " + _join([_position(scene.objects[i].position, rng) for i in group])
        parts.append((text, tuple(group)))
    return _join_spans(parts)


def _relational(scene: Scene, rng: np.random.Generator) -> Spans:
    order = [int(i) for i in rng.permutation(len(scene.objects))]
    a, b = scene.objects[order[0]], scene.objects[order[1]]
    spans: Spans = [(f"{_noun(a, rng)} {relation(a, b)} ", (order[0],)), (_noun(b, rng), (order[1],))]
    if len(scene.objects) == 3:
        c = scene.objects[order[2]]
        spans += [(", and ", ()), (f"{_noun(c, rng)} {_position(c.position, rng)}", (order[2],))]
    return spans


def caption_spans(scene: Scene, rng: np.random.Generator) -> Spans:
    """:func:`caption` as spans, each with the objects it describes."""
    repeats = len(_groups(scene)) < len(scene.objects)
    style = rng.random()
    if len(scene.objects) >= 2 and not repeats and style < 0.3:
        body = _relational(scene, rng)
    else:
        body = _listing(scene, rng, with_positions=style < 0.85)
    if rng.random() < 0.7:
        body.append((_background(scene, rng), ()))
    return [(str(_pick(rng, PREFIXES, False)), ()), *body]


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A varied caption of ``scene``; the same generator state gives the same caption."""
    return joined(caption_spans(scene, rng))


def explicit_spans(scene: Scene) -> Spans:
    """:func:`explicit_caption` as spans."""
    parts: Spans = []
    for group in _groups(scene):
        first = scene.objects[group[0]]
        words = f"{_colour(first.colour, None)} {_kind(first.kind, len(group), None)}"
        noun = _a(words) if len(group) == 1 else f"{NUMBERS[len(group)]} {words}"
        positions = _join([_position(scene.objects[i].position, None) for i in group])
        parts.append((noun + " " + positions, tuple(group)))
    return [*_join_spans(parts), (" on " + _a(f"{scene.background} background"), ())]


def explicit_caption(scene: Scene) -> str:
    """The canonical caption stating every object's colour, kind, position and count, and the background."""
    return joined(explicit_spans(scene))


def word_index(words: list[str], vocabulary: frozenset[str]) -> int | None:
    """The index of the first of ``words`` in ``vocabulary``, or None."""
    return next((i for i, word in enumerate(words) if word in vocabulary), None)


def omit_attribute(phrase: str, attribute: str) -> str:
    """An object phrase that leaves its colour unsaid ("a circle in the centre") or its kind ("a red
    shape in the centre")."""
    words = phrase.split(" ")
    vocabulary = {"colour": COLOUR_VOCABULARY, "kind": KIND_VOCABULARY}[attribute]
    at = word_index(words, vocabulary)
    if at is None:
        raise ValueError(f"the object phrase {phrase!r} states no {attribute}")
    if attribute == "kind":
        words[at] = GENERIC_KIND[words[at] in PLURAL_KINDS]
        return " ".join(words)
    del words[at]
    if at > 0 and words[at - 1] in ("a", "an"):
        words[at - 1] = "an" if words[at][0] in "aeiou" else "a"
    return " ".join(words)
