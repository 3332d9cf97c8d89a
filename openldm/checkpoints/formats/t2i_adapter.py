"""T2I-Adapter key maps: the reference layout (``Adapter``, ours: ``body.{level * n + index}``) and
diffusers' ``T2IAdapter`` of type ``full_adapter`` (``adapter.body.{level}.resnets.{index}``, with the
level's ``in_conv`` on the level rather than on its first block)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

StateDict = dict[str, torch.Tensor]


def t2i_adapter_key_to_diffusers(key: str, num_res_blocks: int) -> str:
    if m := re.fullmatch(r"body\.(\d+)\.(block[12])\.(weight|bias)", key):
        level, index = divmod(int(m[1]), num_res_blocks)
        return f"adapter.body.{level}.resnets.{index}.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"body\.(\d+)\.in_conv\.(weight|bias)", key):
        return f"adapter.body.{int(m[1]) // num_res_blocks}.in_conv.{m[2]}"
    return f"adapter.{key}"


def t2i_adapter_to_diffusers(sd: Mapping[str, torch.Tensor], num_res_blocks: int) -> StateDict:
    return {t2i_adapter_key_to_diffusers(k, num_res_blocks): v for k, v in sd.items()}


def diffusers_num_res_blocks(sd: Mapping[str, torch.Tensor]) -> int:
    return len({k.split(".")[4] for k in sd if k.startswith("adapter.body.0.resnets.")})


def t2i_adapter_from_diffusers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """``sd`` in diffusers' names -> ours. Raises KeyError naming a key that has no place in ours."""
    n = diffusers_num_res_blocks(sd)
    out: StateDict = {}
    for key, value in sd.items():
        if m := re.fullmatch(r"adapter\.body\.(\d+)\.resnets\.(\d+)\.(block[12]\.(?:weight|bias))", key):
            out[f"body.{int(m[1]) * n + int(m[2])}.{m[3]}"] = value
        elif m := re.fullmatch(r"adapter\.body\.(\d+)\.in_conv\.(weight|bias)", key):
            out[f"body.{int(m[1]) * n}.in_conv.{m[2]}"] = value
        elif m := re.fullmatch(r"adapter\.(conv_in\.(?:weight|bias))", key):
            out[m[1]] = value
        else:
            raise KeyError(key)
    return out
