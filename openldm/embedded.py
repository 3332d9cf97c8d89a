"""The embedded default model: a small SD 1 model shipped with the package.

It was trained by ``openldm train`` (:mod:`openldm.train.embedded`) on the procedural shapes dataset
(:mod:`openldm.shapes`), so it draws prompts such as "a red circle on a blue background" at 64x64 pixels.
It is an ordinary SD 1 single file (fp16) read through the normal loader with the ``embedded`` preset,
so everything that works on a real checkpoint works on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from openldm.checkpoints.errors import MissingWeightsError

if TYPE_CHECKING:
    from openldm.checkpoints.load import StableDiffusion

EMBEDDED_FILE = Path(__file__).parent / "data" / "embedded.safetensors"
EMBEDDED_PRESET = "embedded"
# The prompt `openldm txt2img` draws when neither --ckpt nor --prompt is given: one the model knows.
EMBEDDED_PROMPT = "a red circle on a blue background"


def embedded_file() -> Path:
    """The packaged weights; :class:`MissingWeightsError` when the installation lacks them."""
    if not EMBEDDED_FILE.is_file():
        raise MissingWeightsError(
            EMBEDDED_FILE,
            "the embedded default model is missing from this installation",
            "Reinstall openldm (the wheel ships openldm/data/embedded.safetensors), rebuild it with "
            "`openldm train --out runs/embedded --export openldm/data/embedded.safetensors`, "
            "or pass a checkpoint of your own (load(path), --ckpt PATH)",
        )
    return EMBEDDED_FILE


def load_embedded(**options: Any) -> StableDiffusion:
    """Load the embedded model; ``options`` are :func:`openldm.checkpoints.load.load`'s (device, dtype...)."""
    from openldm.checkpoints.load import load

    if "preset" in options:
        raise TypeError("load_embedded() takes no preset: the embedded model is built from its own preset")
    return load(embedded_file(), preset=EMBEDDED_PRESET, **options)
