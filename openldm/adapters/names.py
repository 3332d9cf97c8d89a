"""Which layer of the model a LoRA key names: every spelling found in the wild, in one table.

A LoRA file names the layer it changes in one of these ways (the UNet's layer ``input_blocks.1.1.proj_in``
in our, the original, names is ``down_blocks.0.attentions.0.proj_in`` in diffusers'):

* kohya / the web UI: ``lora_unet_down_blocks_0_attentions_0_proj_in`` (diffusers' path, dots as
  underscores), or the same over the original path (``lora_unet_input_blocks_1_1_proj_in``);
  ``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` for the text encoder;
* diffusers / PEFT: ``unet.down_blocks.0.attentions.0.proj_in`` and ``text_encoder.text_model.encoder...``
  (``text_model.`` may be absent), and the older attention-processor spelling
  ``unet....attn1.processor.to_q_lora``.

:func:`layer_table` lists every spelling of every layer that has a weight; :func:`normalise` turns the
older spellings into the current ones first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

from openldm.checkpoints.formats.unet import unet_key_to_diffusers
from openldm.config import UNetConfig

Network = Literal["unet", "text_encoder"]
PATCHABLE = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)

_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")
_TEXT_PROCESSOR = re.compile(r"\.(to_q|to_k|to_v|to_out)_lora$")
_TEXT_PROJECTIONS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


@dataclass(frozen=True)
class Layer:
    """One layer of the model a LoRA can change: its network and its module path there."""

    network: Network
    path: str


def normalise(name: str) -> str:
    """The current spelling of a layer name written in diffusers' older attention-processor style."""
    if m := _PROCESSOR.search(name):
        target = "to_out.0" if m[1] == "to_out" else m[1]
        return name[: m.start()] + "." + target
    if name.startswith("text_encoder.") and (m := _TEXT_PROCESSOR.search(name)):
        return name[: m.start()] + "." + _TEXT_PROJECTIONS[m[1]]
    return name


def _underscored(path: str) -> str:
    return path.replace(".", "_")


def _unet_names(unet: nn.Module, config: UNetConfig) -> dict[str, Layer]:
    names: dict[str, Layer] = {}
    for path, module in unet.named_modules():
        if not isinstance(module, PATCHABLE):
            continue
        layer = Layer("unet", path)
        theirs = unet_key_to_diffusers(path + ".weight", config)[: -len(".weight")]
        for name in (
            f"lora_unet_{_underscored(theirs)}",
            f"lora_unet_{_underscored(path)}",
            f"unet.{theirs}",
            theirs,
        ):
            names[name] = layer
    return names


def _text_names(text_encoder: nn.Module) -> dict[str, Layer]:
    names: dict[str, Layer] = {}
    for path, module in text_encoder.named_modules():
        if not isinstance(module, PATCHABLE):
            continue
        layer = Layer("text_encoder", path)
        short = path.removeprefix("text_model.")
        for name in (
            f"lora_te_{_underscored(path)}",
            f"lora_te_{_underscored(short)}",  # written from transformers 5's CLIPTextModel
            f"text_encoder.{path}",
            f"text_encoder.{short}",
        ):
            names[name] = layer
    return names


def layer_table(unet: nn.Module, config: UNetConfig, text_encoder: nn.Module) -> dict[str, Layer]:
    """Every spelling of every patchable layer of ``unet`` and ``text_encoder`` -> that layer."""
    return {**_unet_names(unet, config), **_text_names(text_encoder)}
