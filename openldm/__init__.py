"""openldm: an exact, open implementation of Stable Diffusion and its family.

Importing the package is cheap: heavy modules load when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from openldm.config import PRESETS, ModelSpec, preset

if TYPE_CHECKING:
    from openldm.checkpoints.load import StableDiffusion

__all__ = ["PRESETS", "ModelSpec", "StableDiffusion", "describe", "load", "preset"]
__version__ = "0.1.0"


def load(path_or_id: str, **options: Any) -> StableDiffusion:
    """Load a checkpoint: a single ``.safetensors``/``.ckpt`` file, a diffusers folder or a hub id.

    See :func:`openldm.checkpoints.load.load` for the options.
    """
    from openldm.checkpoints.load import load as _load

    return _load(path_or_id, **options)


def describe(model: StableDiffusion) -> str:
    """A short human-readable description of a loaded model."""
    from openldm.checkpoints.load import describe as _describe

    return _describe(model)
