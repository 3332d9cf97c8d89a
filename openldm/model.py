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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from openldm import adapters
from openldm.adapters import Adapters
from openldm.adapters.embeddings import Embedding
from openldm.adapters.lora_files import LoraFile
from openldm.checkpoints.controlnet_file import read_controlnet
from openldm.checkpoints.load import Networks
from openldm.checkpoints.load import describe as _describe
from openldm.checkpoints.load import load as load_networks
from openldm.embedded import load_embedded_networks
from openldm.nn.controlnet import ControlNetModel
from openldm.nn.t2i_adapter import T2IAdapter
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
    """A loaded model: its spec, networks, tokenizer and extras, and the pipelines as methods; its
    adapters (LoRAs, embeddings, a swapped VAE) are loaded and unloaded by the methods below."""

    adapters: Adapters = field(default_factory=Adapters)

    generate = generate
    txt2img = txt2img
    img2img = img2img
    inpaint = inpaint
    depth2img = depth2img
    upscale = upscale
    variations = variations

    def load_lora(
        self, path: str | os.PathLike[str], weight: float = 1.0, text_weight: float | None = None
    ) -> LoraFile:
        """Apply a LoRA / LyCORIS file (kohya, diffusers/PEFT, LoCon, LoHa, LoKr, full and norm diffs) to
        every generation from now on, at ``weight`` (``text_weight`` for the text encoder if given)."""
        return adapters.load_lora(self, path, weight, text_weight)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove the LoRA ``name`` (its file name without suffix), or all; restores the weights exactly."""
        adapters.unload_lora(self, name)

    def add_lora_dir(self, folder: str | os.PathLike[str]) -> None:
        """A folder where the prompts' ``<lora:name:weight>`` tags find their files."""
        path = Path(folder)
        if not path.is_dir():
            raise NotADirectoryError(f"LoRA folder {os.fspath(folder)!r} is not a folder")
        self.adapters.lora_dirs.append(path)

    def add_controlnet_dir(self, folder: str | os.PathLike[str]) -> None:
        """A folder where ControlNets and T2I-Adapters are found by name (the server's model list)."""
        path = Path(folder)
        if not path.is_dir():
            raise NotADirectoryError(f"ControlNet folder {os.fspath(folder)!r} is not a folder")
        self.adapters.controlnet_dirs.append(path)

    def load_embedding(self, path: str | os.PathLike[str], word: str | None = None) -> Embedding:
        """A textual inversion embedding, used in prompts as ``word`` (default: the file's name)."""
        return adapters.load_embedding(self, path, word)

    def unload_embedding(self, word: str | None = None) -> None:
        adapters.unload_embedding(self, word)

    def load_vae(self, path: str | os.PathLike[str] | None) -> None:
        """Decode and encode with another VAE (an original or diffusers file or folder); None: its own."""
        adapters.load_vae(self, path)

    def load_controlnet(self, path: str | os.PathLike[str]) -> ControlNetModel | T2IAdapter:
        """A ControlNet or a T2I-Adapter (original single file, diffusers file or folder) fitted to this
        model, to pass in ``controls=[Control(network, image, ...)]``."""
        return read_controlnet(path, self.unet)

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
