"""The weights of a diffusers folder's component (``unet/``, ``vae/``, ``text_encoder/``,
``depth_estimator/``...): safetensors preferred, ``.bin`` through the restricted unpickler, an
optional variant (``model.fp16.safetensors``), shards merged from their ``*.index.json``."""

from __future__ import annotations

from pathlib import Path

import torch

from openldm.checkpoints.detect import read_json
from openldm.checkpoints.errors import CorruptCheckpointError, MissingWeightsError
from openldm.checkpoints.read import file_inside, read_state_dict

StateDict = dict[str, torch.Tensor]


def weight_candidates(folder: Path, variant: str | None) -> list[Path]:
    stems = ("diffusion_pytorch_model", "model", "pytorch_model")
    tags = [f".{variant}"] if variant else ["", ".fp16"]
    return [folder / f"{stem}{tag}.{ext}" for tag in tags for stem in stems for ext in ("safetensors", "bin")]


def component_weights(folder: Path, component: str, variant: str | None) -> StateDict:
    """The weights of ``folder/component``: safetensors preferred, ``.bin`` read safely, shards merged."""
    sub = folder / component
    for candidate in weight_candidates(sub, variant):
        if candidate.is_file():
            return read_state_dict(candidate)
        index = candidate.with_name(candidate.name + ".index.json")
        if index.is_file():
            merged: StateDict = {}
            for shard in _shards(sub, index):
                merged.update(read_state_dict(shard))
            return merged
    wanted = "diffusion_pytorch_model" if component in ("unet", "vae") else "model"
    raise MissingWeightsError(
        sub,
        f"no weights found (looked for {wanted}{'.' + variant if variant else ''}.safetensors and .bin)",
        "Download the weights of this component into the folder"
        + ("" if variant else ", or pass variant='fp16' for *.fp16.* files"),
    )


def _shards(folder: Path, index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` lists (``weight_map``: tensor name -> file), each checked to
    be a regular file inside ``folder``."""
    weight_map = read_json(index, index.name).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError(
            index, "its weight_map is not a non-empty JSON object", _REDOWNLOAD_INDEX
        )
    if not all(isinstance(name, str) for name in weight_map.values()):
        raise CorruptCheckpointError(
            index, "its weight_map names a file with a value that is not a string", _REDOWNLOAD_INDEX
        )
    return [file_inside(folder, name, index.name) for name in sorted(set(weight_map.values()))]


_REDOWNLOAD_INDEX = "Download the index file again"
