"""The networks a checkpoint carries beside the three: the depth model's MiDaS DPT-hybrid estimator and
unCLIP's CLIP image encoder.

:func:`~openldm.checkpoints.detect.detect_extra_networks` says which a checkpoint holds and in which
layout; :mod:`~openldm.checkpoints.formats` converts their tensors; :func:`~openldm.checkpoints.build.
build_network` builds them as the UNet is built (meta device, every key and shape checked, strict). An
extra network whose weights cannot be built does not fail the load (the UNet, VAE and text encoder
work without it, and a depth model given a depth map never needs its estimator): the reason is kept
in ``unbuilt`` and the pipeline that needs the network raises it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from openldm.checkpoints.build import build_network
from openldm.checkpoints.components import component_weights
from openldm.checkpoints.detect import (
    ExtraNetwork,
    detect_extra_networks,
    image_encoder_activation,
    read_json,
)
from openldm.checkpoints.errors import AdapterError, CheckpointError, UnknownArchitectureError
from openldm.checkpoints.formats.clip_vision import (
    embedder_activation,
    infer_vision_config,
    vision_config_from_transformers,
    vision_from_embedder,
    vision_from_transformers,
)
from openldm.checkpoints.formats.midas import midas_from_transformers
from openldm.checkpoints.read import read_state_dict
from openldm.config import UNetConfig
from openldm.nn.clip_vision import CLIPVisionEncoder, VisionConfig
from openldm.nn.midas import MiDaSDepthEstimator, infer_midas_config

log = logging.getLogger("openldm")
StateDict = dict[str, torch.Tensor]


@dataclass
class ExtraNetworks:
    """The built extra networks (None: absent or not buildable) and why any present one was not built."""

    depth_estimator: MiDaSDepthEstimator | None = None
    image_encoder: CLIPVisionEncoder | None = None
    unbuilt: dict[str, str] = field(default_factory=dict)


def build_extra_networks(
    extras: Mapping[str, StateDict],
    source: str,
    unet: UNetConfig,
    dtype: torch.dtype | None,
    device: str | torch.device,
) -> ExtraNetworks:
    """Build every extra network of a loaded checkpoint's ``extras`` (see the module docstring)."""
    built = ExtraNetworks()
    for name, extra in detect_extra_networks(extras).items():
        try:
            if name == "depth_estimator":
                built.depth_estimator = depth_estimator(extras[extra.component], extra, source, device)
            else:
                built.image_encoder = image_encoder(extras, extra, source, unet, dtype, device)
        except (CheckpointError, ValueError, KeyError, IndexError) as e:
            built.unbuilt[name] = str(e)
            log.info("%s: its %s cannot be built (%s)", source, name.replace("_", " "), e)
    return built


def depth_estimator(
    sd: StateDict, extra: ExtraNetwork, source: str, device: str | torch.device
) -> MiDaSDepthEstimator:
    """The depth estimator of either layout (see :func:`midas_estimator`)."""
    return midas_estimator(
        midas_from_transformers(sd) if extra.layout == "dpt-transformers" else sd, source, device
    )


def midas_estimator(
    sd: Mapping[str, torch.Tensor], source: str = "", device: str | torch.device = "cpu"
) -> MiDaSDepthEstimator:
    """The MiDaS DPT-hybrid estimator of original-layout tensors (keys without ``depth_model.``), in
    float32 (its input and output are float32 in every pipeline)."""
    try:
        config = infer_midas_config(sd)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"the depth estimator weights are not a MiDaS DPT-hybrid model ({e})") from e
    return build_network(
        MiDaSDepthEstimator, config, dict(sd), "depth estimator", source, torch.float32, device
    )


_MIDAS_ADVICE = (
    "Pass dpt_hybrid-midas-501f0c75.pt, the 512-depth-ema checkpoint, or a diffusers depth model's folder"
)


def read_depth_estimator(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> MiDaSDepthEstimator:
    """A MiDaS DPT-hybrid estimator from its own file: the released ``dpt_hybrid-midas-*.pt``
    (``pretrained.*``, ``scratch.*``), a depth checkpoint (its ``depth_model.*``), transformers'
    ``DPTForDepthEstimation`` file, or a diffusers depth model's folder (its ``depth_estimator``)."""
    path = Path(path)
    if path.is_dir():  # a diffusers depth model's folder, or its depth_estimator folder itself
        folder, component = (
            (path, "depth_estimator") if (path / "depth_estimator").is_dir() else (path.parent, path.name)
        )
        sd = component_weights(folder, component, None)
    else:
        sd = read_state_dict(path)
    if any(k.startswith("depth_model.") for k in sd):
        sd = {k.removeprefix("depth_model."): v for k, v in sd.items() if k.startswith("depth_model.")}
    elif any(k.startswith("pretrained.") for k in sd):
        sd = {f"model.{k}": v for k, v in sd.items()}
    elif any(k.startswith("dpt.") for k in sd):
        sd = midas_from_transformers(sd)
    try:
        return midas_estimator(sd, os.fspath(path), device)
    except (ValueError, CheckpointError) as e:
        raise AdapterError(path, f"no MiDaS DPT-hybrid depth model in it ({e})", _MIDAS_ADVICE) from None


def image_encoder(
    extras: Mapping[str, StateDict],
    extra: ExtraNetwork,
    source: str,
    unet: UNetConfig,
    dtype: torch.dtype | None,
    device: str | torch.device,
) -> CLIPVisionEncoder:
    """unCLIP's CLIP image tower, in the UNet's dtype; its embedding must be half the UNet's class input."""
    try:
        if extra.layout == "open_clip":
            embedder = extras[extra.component]
            sd = vision_from_embedder(embedder)
            config = infer_vision_config(sd, embedder_activation(embedder))
        else:
            sd = vision_from_transformers(extras[extra.component])
            config = _transformers_config(sd, source)
    except (ValueError, KeyError) as e:
        raise UnknownArchitectureError(
            source, f"the CLIP image encoder cannot be read ({e})", "Check that this is an unCLIP checkpoint"
        ) from e
    if unet.adm_in_channels != 2 * config.embed_dim:
        raise UnknownArchitectureError(
            source,
            f"the UNet reads {unet.adm_in_channels} class values but the image encoder gives "
            f"{config.embed_dim}-wide embeddings (twice that is needed)",
            "The image encoder does not belong to this UNet",
        )
    return build_network(CLIPVisionEncoder, config, sd, "CLIP image encoder", source, dtype, device)


def _transformers_config(sd: StateDict, source: str) -> VisionConfig:
    """A diffusers folder's ``image_encoder/config.json``; without it, the tower told by its width."""
    folder = Path(source) if os.path.isdir(source) else None
    path = folder / "image_encoder" / "config.json" if folder is not None else None
    if path is not None and path.is_file():
        return vision_config_from_transformers(read_json(path, "image_encoder/config.json"))
    width = int(sd["conv1.weight"].shape[0]) if "conv1.weight" in sd else -1
    return infer_vision_config(sd, image_encoder_activation(width, source))
