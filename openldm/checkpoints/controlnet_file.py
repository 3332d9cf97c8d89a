"""A ControlNet from its file, fitted to a loaded model: the original single file (``control_model.*``
keys, as ControlNet 1.0 and 1.1 ship, ``.pth`` through the restricted unpickler or ``.safetensors``;
also without the prefix), a diffusers ``ControlNetModel`` file, or a diffusers folder.

Its size and SD version are read from its shapes (the UNet's encoder, as ``detect.py`` reads a UNet)
and checked against the model's UNet before anything is built: a ControlNet of SD 2 on an SD 1 model
is an error naming both. It is built with the model's UNet configuration (the head layout the weights
cannot show), its own input width, and the model's dtype and device. A T2I-Adapter file given in its
place is read by :mod:`~openldm.checkpoints.t2i_adapter_file`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from openldm.checkpoints.build import build_network, computed_like, on_meta
from openldm.checkpoints.errors import AdapterError, CheckpointError
from openldm.checkpoints.formats.controlnet import controlnet_from_diffusers
from openldm.checkpoints.formats.unet import UnsupportedUNetError, infer_unet_config
from openldm.checkpoints.read import read_state_dict, weights_file
from openldm.checkpoints.t2i_adapter_file import build_t2i_adapter, is_t2i_adapter
from openldm.config import UNetConfig
from openldm.files import file_hash
from openldm.nn.controlnet import ControlNetModel
from openldm.nn.t2i_adapter import T2IAdapter

StateDict = dict[str, torch.Tensor]
PREFIX = "control_model."
_ADVICE = "Use a ControlNet made for this model's version (SD 1.x or SD 2.x)"
_SIZES = ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "context_dim")


def _family(config: UNetConfig) -> str:
    return {768: "SD 1.x", 1024: "SD 2.x"}.get(config.context_dim, f"{config.context_dim}-wide text")


def _our_layout(path: Path, sd: StateDict, unet: UNetConfig) -> tuple[StateDict, UNetConfig]:
    if any(k.startswith(PREFIX) for k in sd):
        sd = {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}
    if "controlnet_cond_embedding.conv_in.weight" in sd:
        in_channels = sd["conv_in.weight"].shape[1]
        config = dataclasses.replace(unet, in_channels=in_channels)
        with on_meta():
            ours = list(ControlNetModel(config).state_dict())
        try:
            sd = controlnet_from_diffusers(sd, ours, config)
        except KeyError as e:
            raise AdapterError(
                path, f"a diffusers ControlNet that does not fit this model ({e.args[0]})", _ADVICE
            ) from None
    if "input_hint_block.0.weight" not in sd:
        raise AdapterError(path, "no ControlNet in it (no input_hint_block)", "Pass a ControlNet file")
    try:
        found = infer_unet_config(sd)
    except UnsupportedUNetError as e:
        raise AdapterError(path, f"an unsupported ControlNet ({e})", _ADVICE) from None
    differs = [
        f"{name} {getattr(found, name)}, not {getattr(unet, name)}"
        for name in _SIZES
        if getattr(found, name) != getattr(unet, name)
    ]
    if differs:
        raise AdapterError(
            path,
            f"a ControlNet for {_family(found)}, not this model ({_family(unet)}): {'; '.join(differs)}",
            _ADVICE,
        )
    return sd, dataclasses.replace(unet, in_channels=found.in_channels)


def read_controlnet(path: str | os.PathLike[str], unet: torch.nn.Module) -> ControlNetModel | T2IAdapter:
    """The ControlNet or T2I-Adapter in ``path``, fitted to ``unet`` (a loaded model's), on its dtype
    and device."""
    path = Path(path)
    file = weights_file(path, "ControlNet weights", _ADVICE)
    parameter = next(unet.parameters())
    try:
        sd = read_state_dict(file)
        if is_t2i_adapter(sd):
            network: ControlNetModel | T2IAdapter = build_t2i_adapter(path, sd, unet)
        else:
            sd, config = _our_layout(path, sd, unet.config)
            network = build_network(
                ControlNetModel, config, sd, "ControlNet", os.fspath(path), parameter.dtype, parameter.device
            )
    except AdapterError:
        raise
    except CheckpointError as e:
        raise AdapterError(path, e.problem, e.advice) from None
    computed_like(network, unet)
    network.name = path.name if path.is_dir() else path.stem
    network.short_hash = file_hash(file)[:8]
    return network
