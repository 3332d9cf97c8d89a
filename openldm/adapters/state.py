"""A model's adapters and the operations on them (see :mod:`openldm.adapters`)."""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from openldm.adapters.embeddings import Embedding, install, read_embedding
from openldm.adapters.lora_files import LoraFile, find_lora, read_lora
from openldm.adapters.names import Network, layer_table
from openldm.adapters.patcher import LoraUse, Patches, Source
from openldm.checkpoints.vae_file import read_vae
from openldm.config import ModelSpec
from openldm.files import file_hash
from openldm.nn.clip import CLIPTextEncoder
from openldm.nn.unet import UNetModel
from openldm.nn.vae import AutoencoderKL
from openldm.tokenizer import CLIPTokenizer

FILES_KEPT = 16  # LoRA files kept read (memory-mapped) for the next generation that names them


@dataclass
class Adapters:
    """The adapters of one loaded model."""

    loras: list[LoraUse] = field(default_factory=list)  # loaded for good: in every generation
    lora_dirs: list[Path] = field(default_factory=list)  # where <lora:name> is looked up
    embeddings: list[Embedding] = field(default_factory=list)
    vae_file: Path | None = None  # the VAE swapped in, if any
    own_vae: AutoencoderKL | None = None  # the model's own VAE while another is swapped in
    patches: Patches = field(default_factory=Patches)
    files: dict[tuple[str, int, int], LoraFile] = field(
        default_factory=dict
    )  # read files, by path/size/mtime
    controlnet_dirs: list[Path] = field(default_factory=list)  # where ControlNets are found by name
    controlnets: OrderedDict[tuple[str, int, int], Any] = field(default_factory=OrderedDict)  # read, kept


class AdapterModel(Protocol):
    spec: ModelSpec
    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder
    tokenizer: CLIPTokenizer
    adapters: Adapters
    reread: Source | None


def _apply(model: AdapterModel, uses: tuple[LoraUse, ...]) -> None:
    model.adapters.patches.apply(_networks(model), uses, model.reread)


def _networks(model: AdapterModel) -> dict[Network, nn.Module]:
    return {"unet": model.unet, "text_encoder": model.text_encoder}


def _read(model: AdapterModel, path: Path) -> LoraFile:
    """The file at ``path`` read for ``model``, once per version of the file."""
    info = path.stat()
    key = (os.fspath(path.resolve()), info.st_size, info.st_mtime_ns)
    cached = model.adapters.files.get(key)
    if cached is not None:
        return cached
    networks = _networks(model)
    layers = layer_table(model.unet, model.spec.unet, model.text_encoder)
    weights = {
        layer: networks[layer.network].get_submodule(layer.path).weight for layer in set(layers.values())
    }
    file = read_lora(path, layers, weights, model.spec.unet.context_dim, model.spec.variant)
    files = model.adapters.files
    in_use = {id(u.file) for u in model.adapters.patches.applied}
    for old in [k for k, f in files.items() if id(f) not in in_use][: max(0, len(files) + 1 - FILES_KEPT)]:
        del files[old]  # the least recently read files go first (a server sees many prompts' LoRAs)
    files[key] = file
    return file


def load_lora(
    model: AdapterModel, path: str | os.PathLike[str], weight: float = 1.0, text_weight: float | None = None
) -> LoraFile:
    """Apply the LoRA / LyCORIS file at ``path`` to every generation from now on, at ``weight``
    (``text_weight`` for the text encoder, ``weight`` if None). Returns the file read."""
    file = _read(model, Path(path))
    use = LoraUse(file, float(weight), float(weight if text_weight is None else text_weight))
    loras = [u for u in model.adapters.loras if u.file.path != file.path] + [use]
    _apply(model, tuple(loras))
    model.adapters.loras = loras
    return file


def unload_lora(model: AdapterModel, name: str | None = None) -> None:
    """Remove the LoRA ``name`` (a file's name without suffix), or all with None; the weights are then
    exactly what they were without it."""
    kept = [u for u in model.adapters.loras if name is not None and u.file.name != name]
    if name is not None and len(kept) == len(model.adapters.loras):
        loaded = ", ".join(u.file.name for u in model.adapters.loras) or "none"
        raise ValueError(f"no LoRA named {name!r} is loaded (loaded: {loaded})")
    _apply(model, tuple(kept))
    model.adapters.loras = kept


def activate(model: AdapterModel, tags: list[tuple[str, float, float]]) -> tuple[LoraUse, ...]:
    """Apply the loaded LoRAs plus the prompt tags' ``(name, text weight, UNet weight)`` (found in the
    model's LoRA folders); returns what is applied."""
    wanted: dict[str, tuple[float, float]] = {}
    for name, text, unet in tags:
        if wanted.setdefault(name, (text, unet)) != (text, unet):
            raise ValueError(f"the prompts ask for LoRA {name!r} at two different weights; use one")
    uses = list(model.adapters.loras)
    for name, (text, unet) in wanted.items():
        file = _read(model, find_lora(name, model.adapters.lora_dirs))
        uses.append(LoraUse(file, unet, text))
    _apply(model, tuple(uses))
    return tuple(uses)


def load_embedding(model: AdapterModel, path: str | os.PathLike[str], word: str | None = None) -> Embedding:
    """Make the textual inversion embedding at ``path`` a word of the prompts (its file name, or ``word``)."""
    embedding = read_embedding(path, model.spec.text.width, word)
    kept = [e for e in model.adapters.embeddings if e.word != embedding.word]
    install(model.tokenizer, model.text_encoder, [*kept, embedding])
    model.adapters.embeddings = [*kept, embedding]
    return embedding


def unload_embedding(model: AdapterModel, word: str | None = None) -> None:
    """Remove the embedding ``word``, or all with None."""
    kept = [e for e in model.adapters.embeddings if word is not None and e.word != word.lower()]
    if word is not None and len(kept) == len(model.adapters.embeddings):
        raise ValueError(f"no embedding {word!r} is loaded")
    install(model.tokenizer, model.text_encoder, kept)
    model.adapters.embeddings = kept


def load_vae(model: AdapterModel, path: str | os.PathLike[str] | None) -> None:
    """Decode and encode with the VAE in ``path`` (an original-format or diffusers VAE file, or a
    diffusers ``vae/`` folder); None puts the model's own VAE back."""
    adapters = model.adapters
    if path is None:
        if adapters.own_vae is not None:
            model.vae, adapters.own_vae, adapters.vae_file = adapters.own_vae, None, None
        return
    own = adapters.own_vae if adapters.own_vae is not None else model.vae
    model.vae = read_vae(path, own)
    adapters.own_vae, adapters.vae_file = own, Path(path)


def vae_hash(path: Path) -> str:
    """The web UI's ``VAE hash``: sha256 of the VAE file, first 10 hex digits (computed once per file
    version)."""
    weights = path / "diffusion_pytorch_model.safetensors" if path.is_dir() else path
    info = weights.stat()
    return _hash(os.fspath(weights.resolve()), info.st_size, info.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _hash(path: str, size: int, mtime: int) -> str:
    del size, mtime  # part of the cache key only
    return file_hash(Path(path), skip_header=False)[:10]
