"""openldm: an exact, open implementation of Stable Diffusion and its family.

Importing the package is cheap: heavy modules load when first used.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from openldm.config import PRESETS, ModelSpec, preset

if TYPE_CHECKING:
    from openldm.model import StableDiffusion

__all__ = ["PRESETS", "ModelSpec", "StableDiffusion", "describe", "load", "preset"]
__version__ = "0.1.0"


def load(path_or_id: str | os.PathLike[str] | None = None, **options: Any) -> StableDiffusion:
    """Load a checkpoint: a single ``.safetensors``/``.ckpt`` file, a diffusers folder or a hub id.

    With no argument, the embedded default model shipped with the package: a small SD 1 model trained
    on procedural shapes that draws small images (``openldm.load().txt2img("a red circle on a blue
    background")``); see :mod:`openldm.embedded`. See :func:`openldm.model.load`.
    """
    from openldm.model import load as _load

    return _load(path_or_id, **options)


def describe(model: StableDiffusion) -> str:
    """A short human-readable description of a loaded model."""
    from openldm.model import describe as _describe

    return _describe(model)


def __getattr__(name: str) -> Any:
    """``openldm.StableDiffusion``, imported when first asked for (the package's import stays cheap)."""
    if name == "StableDiffusion":
        from openldm.model import StableDiffusion

        return StableDiffusion
    raise AttributeError(f"module 'openldm' has no attribute {name!r}")
