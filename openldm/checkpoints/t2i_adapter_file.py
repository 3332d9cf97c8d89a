"""A T2I-Adapter from its state dict, fitted to a loaded model: the reference layout (``conv_in``,
``body.N.*``, as the released SD 1.x ``.pth`` / ``.safetensors`` files) or diffusers' ``T2IAdapter``
(``adapter.*``, type ``full_adapter``).

Its configuration is read from its shapes: the image channels from ``conv_in`` (8x8 pixels fold into 64
channels each), the widths per level, the blocks per level (the first ``in_conv`` sits on the first
block of level 1), the kernel size and the kind of downsampling. The widths must be the UNet's level
widths; the light (color), style and SDXL adapters are named and refused.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from openldm.checkpoints.build import build_network
from openldm.checkpoints.errors import AdapterError
from openldm.checkpoints.formats.t2i_adapter import t2i_adapter_from_diffusers
from openldm.config import UNetConfig
from openldm.nn.t2i_adapter import UNSHUFFLE, T2IAdapter, T2IAdapterConfig

StateDict = dict[str, torch.Tensor]
_ADVICE = "Use a full T2I-Adapter made for SD 1.x / 2.x (the canny, depth, sketch, openpose, seg ones)"


def is_t2i_adapter(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("adapter.", "body.", "style_embedding")) for k in sd)


def _refuse_other_kinds(path: Path, sd: Mapping[str, torch.Tensor]) -> None:
    if "style_embedding" in sd:
        raise AdapterError(path, "a style T2I-Adapter (it reads CLIP image tokens), not supported", _ADVICE)
    if (
        "body.0.body.0.block1.weight" in sd
        or "adapter.body.0.resnets.0.block1.weight" in sd
        and ("adapter.conv_in.weight" not in sd)
    ):
        raise AdapterError(path, "a light (color) T2I-Adapter, not supported", _ADVICE)
    if any(".skep." in k for k in sd):
        raise AdapterError(path, "a T2I-Adapter with skip convolutions (skep), not supported", _ADVICE)


def _config(path: Path, sd: StateDict, levels: int) -> T2IAdapterConfig:
    folded = sd["conv_in.weight"].shape[1]
    if folded % UNSHUFFLE**2 or folded // UNSHUFFLE**2 not in (1, 3):
        raise AdapterError(
            path, f"a T2I-Adapter that folds its image into {folded} channels (an SDXL one?)", _ADVICE
        )
    blocks = sorted(int(m[1]) for k in sd if (m := re.fullmatch(r"body\.(\d+)\.block1\.weight", k)))
    if blocks != list(range(len(blocks))):
        raise AdapterError(path, "a T2I-Adapter with blocks missing", "Download the file again")
    firsts = sorted(int(m[1]) for k in sd if (m := re.fullmatch(r"body\.(\d+)\.in_conv\.weight", k)))
    per_level = firsts[0] if firsts else len(blocks) // levels
    if not per_level or len(blocks) % per_level:
        raise AdapterError(path, f"a T2I-Adapter of {len(blocks)} blocks in uneven levels", _ADVICE)
    return T2IAdapterConfig(
        in_channels=folded // UNSHUFFLE**2,
        channels=tuple(sd[f"body.{i}.block1.weight"].shape[0] for i in range(0, len(blocks), per_level)),
        num_res_blocks=per_level,
        kernel_size=sd["body.0.block2.weight"].shape[-1],
        conv_downsample=any(".down_opt.op." in k for k in sd),
    )


def build_t2i_adapter(path: Path, sd: StateDict, unet: torch.nn.Module) -> T2IAdapter:
    """The adapter in ``sd`` (read from ``path``), fitted to ``unet`` (a loaded model's)."""
    _refuse_other_kinds(path, sd)
    if any(k.startswith("adapter.") for k in sd):
        try:
            sd = t2i_adapter_from_diffusers(sd)
        except KeyError as e:
            raise AdapterError(
                path, f"a diffusers T2I-Adapter with an unknown tensor {e.args[0]}", _ADVICE
            ) from None
    if "conv_in.weight" not in sd or "body.0.block2.weight" not in sd:
        raise AdapterError(path, "no T2I-Adapter in it (no conv_in or body.0)", _ADVICE)
    unet_config: UNetConfig = unet.config
    config = _config(path, sd, len(unet_config.channel_mult))
    widths = tuple(unet_config.model_channels * m for m in unet_config.channel_mult)
    if config.channels != widths:
        raise AdapterError(
            path,
            f"a T2I-Adapter with level widths {config.channels}, not this model's {widths}",
            _ADVICE,
        )
    parameter = next(unet.parameters())
    return build_network(
        T2IAdapter, config, sd, "T2I-Adapter", os.fspath(path), parameter.dtype, parameter.device
    )
