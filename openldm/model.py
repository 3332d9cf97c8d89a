"""The loaded model: a checkpoint's networks and what it makes with them.

:func:`load` reads any checkpoint openldm knows (or, with no path, the embedded model) through
:mod:`openldm.checkpoints`, which only reads, detects, converts and builds; the methods are the
pipelines' functions (:mod:`openldm.pipelines`), bound to the model, with their typed signatures:
``model.txt2img(prompt, steps=25, seed=0)`` is ``openldm.pipelines.txt2img.txt2img(model, prompt, ...)``.
:meth:`StableDiffusion.generate` runs any pipeline :class:`~openldm.pipelines.run.Task` with a
:class:`~openldm.pipelines.options.GenerationOptions` built beforehand (what the command line and the
server do).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from openldm.checkpoints.load import Networks
from openldm.checkpoints.load import describe as _describe
from openldm.checkpoints.load import load as load_networks
from openldm.embedded import load_embedded_networks
from openldm.pipelines.depth2img import depth2img
from openldm.pipelines.img2img import img2img
from openldm.pipelines.inpaint import inpaint
from openldm.pipelines.run import generate
from openldm.pipelines.txt2img import txt2img
from openldm.pipelines.upscale import upscale
from openldm.pipelines.variations import variations

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from openldm.checkpoints.load import LoadOptions


@dataclass
class StableDiffusion(Networks):
    """A loaded model: its spec, networks, tokenizer and extras, and the pipelines as methods."""

    generate = generate
    txt2img = txt2img
    img2img = img2img
    inpaint = inpaint
    depth2img = depth2img
    upscale = upscale
    variations = variations

    @classmethod
    def from_networks(cls, networks: Networks) -> StableDiffusion:
        return cls(**{f.name: getattr(networks, f.name) for f in dataclasses.fields(networks)})


def load(path_or_id: str | os.PathLike[str] | None = None, **options: Unpack[LoadOptions]) -> StableDiffusion:
    """Load a checkpoint: a single ``.safetensors``/``.ckpt`` file, a diffusers folder or a hub id; with no
    argument, the embedded default model shipped with the package. See
    :func:`openldm.checkpoints.load.load` for the options."""
    if path_or_id is None:
        return StableDiffusion.from_networks(load_embedded_networks(**options))
    return StableDiffusion.from_networks(load_networks(path_or_id, **options))


def load_embedded(kind: str | None = None, **options: Unpack[LoadOptions]) -> StableDiffusion:
    """The embedded model (``kind`` None) or its "inpaint" / "depth" variant; see :mod:`openldm.embedded`."""
    return StableDiffusion.from_networks(load_embedded_networks(kind, **options))


def describe(model: Networks) -> str:
    """A few lines on what was loaded: variant, sizes, prediction type, dtype, parameter counts."""
    return _describe(model)
