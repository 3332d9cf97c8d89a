"""The embedded default model: a small SD 1 model shipped with the package.

It was trained by ``openldm train`` (:mod:`openldm.train.embedded`) on the procedural shapes dataset
(:mod:`openldm.shapes`), so it draws prompts such as "a red circle on a blue background" at 64x64 pixels.
It is an ordinary SD 1 single file (fp16) read through the normal loader with the ``embedded`` preset,
so everything that works on a real checkpoint works on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from openldm.checkpoints.packaged import (
    EMBEDDED_FILE,
    EMBEDDED_PRESET,
    VARIANT_PRESETS,
    embedded_file,
    variant_file,
)

if TYPE_CHECKING:
    from openldm.checkpoints.load import Networks

# The prompt `openldm txt2img` draws when neither --ckpt nor --prompt is given: one the model renders
# right. It names the cell: 92% of the one-shape training captions do, and without one the model draws the
# shape twice in about half the images ("a red circle on a blue background": one red circle in 24 of 45
# images over 5 seeds, DDIM 50; with "in the centre" 45 of 45). `openldm eval` measures the case.
EMBEDDED_PROMPT = "a red circle in the centre on a blue background"


def load_embedded_networks(kind: str | None = None, **options: Any) -> Networks:
    """Load the embedded model (``kind`` None) or its "inpaint" / "depth" variant (merged with the base);
    ``options`` are :func:`openldm.checkpoints.load.load`'s (device, dtype...).

    The file is fp16; on the CPU, where fp16 arithmetic is slow (6.5 s instead of 0.6 s for an image at
    25 steps on 2 cores), it loads in float32 (40 MB) unless ``dtype=`` says otherwise."""
    import torch

    from openldm.checkpoints.load import load
    from openldm.devices import resolve_device

    if "preset" in options or "base" in options:
        raise TypeError("the embedded models take no preset or base: the embedded models bring their own")
    options["device"] = resolve_device(options.get("device", "cpu"))
    if options.get("dtype") is None and options["device"].type == "cpu":
        options["dtype"] = torch.float32
    if kind is None:
        return load(embedded_file(), preset=EMBEDDED_PRESET, **options)
    variant = embedded_file(kind)
    return load(variant, preset=VARIANT_PRESETS[kind], base=embedded_file(), **options)


__all__ = [
    "EMBEDDED_FILE",
    "EMBEDDED_PRESET",
    "EMBEDDED_PROMPT",
    "VARIANT_PRESETS",
    "embedded_file",
    "load_embedded_networks",
    "variant_file",
]
