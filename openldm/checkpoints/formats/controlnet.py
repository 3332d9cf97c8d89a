"""ControlNet key maps: the original layout (``cldm.ControlNet``, ours) and diffusers' ``ControlNetModel``.

The encoder's keys map as the UNet's (``unet_key_to_diffusers``); the ControlNet's own parts:
``input_hint_block.0`` / ``.2`` ... ``.12`` / ``.14`` <-> ``controlnet_cond_embedding.conv_in`` /
``blocks.0`` ... ``blocks.5`` / ``conv_out``, ``zero_convs.N.0`` <-> ``controlnet_down_blocks.N``,
``middle_block_out.0`` <-> ``controlnet_mid_block``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from openldm.checkpoints.formats.unet import unet_key_to_diffusers
from openldm.config import UNetConfig

StateDict = dict[str, torch.Tensor]
_HINT_LAST = 14


def controlnet_key_to_diffusers(key: str, config: UNetConfig) -> str:
    if m := re.fullmatch(r"input_hint_block\.(\d+)\.(weight|bias)", key):
        index = int(m[1])
        if index == 0:
            return f"controlnet_cond_embedding.conv_in.{m[2]}"
        if index == _HINT_LAST:
            return f"controlnet_cond_embedding.conv_out.{m[2]}"
        return f"controlnet_cond_embedding.blocks.{index // 2 - 1}.{m[2]}"
    if m := re.fullmatch(r"zero_convs\.(\d+)\.0\.(weight|bias)", key):
        return f"controlnet_down_blocks.{m[1]}.{m[2]}"
    if m := re.fullmatch(r"middle_block_out\.0\.(weight|bias)", key):
        return f"controlnet_mid_block.{m[1]}"
    return unet_key_to_diffusers(key, config)


def controlnet_to_diffusers(sd: Mapping[str, torch.Tensor], config: UNetConfig) -> StateDict:
    return {controlnet_key_to_diffusers(k, config): v for k, v in sd.items()}


def controlnet_from_diffusers(
    sd: Mapping[str, torch.Tensor], ours: list[str], config: UNetConfig
) -> StateDict:
    """``sd`` in diffusers' names -> ours, given the list of our keys (of the network to fill).
    Raises KeyError naming a key that has no place in it."""
    table = {controlnet_key_to_diffusers(k, config): k for k in ours}
    out: StateDict = {}
    for key, value in sd.items():
        if key not in table:
            raise KeyError(key)
        out[table[key]] = value
    return out
