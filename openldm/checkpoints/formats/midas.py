"""The MiDaS DPT-hybrid estimator's layouts: transformers' ``DPTForDepthEstimation`` (the
``depth_estimator`` folder of diffusers' depth pipeline) -> the reference's (``depth_model.*`` of the
original single file, without the prefix; see :mod:`openldm.nn.midas`).

transformers splits the attention's fused ``qkv`` into query/key/value and numbers the fusion blocks
the other way round (its ``fusion_stage.layers.0`` is the reference's ``refinenet4``); it has no
ImageNet head, so the converted weights have none either.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

StateDict = dict[str, torch.Tensor]

_VIT = "model.pretrained.model."
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"dpt\.embeddings\.cls_token", _VIT + "cls_token"),
    (r"dpt\.embeddings\.position_embeddings", _VIT + "pos_embed"),
    (r"dpt\.embeddings\.backbone\.bit\.embedder\.convolution\.", _VIT + "patch_embed.backbone.stem.conv."),
    (r"dpt\.embeddings\.backbone\.bit\.embedder\.norm\.", _VIT + "patch_embed.backbone.stem.norm."),
    (
        r"dpt\.embeddings\.backbone\.bit\.encoder\.stages\.(\d+)\.layers\.(\d+)\.",
        _VIT + r"patch_embed.backbone.stages.\1.blocks.\2.",
    ),
    (r"dpt\.embeddings\.projection\.", _VIT + "patch_embed.proj."),
    (r"dpt\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", _VIT + r"blocks.\1.attn.proj."),
    (r"dpt\.encoder\.layer\.(\d+)\.intermediate\.dense\.", _VIT + r"blocks.\1.mlp.fc1."),
    (r"dpt\.encoder\.layer\.(\d+)\.output\.dense\.", _VIT + r"blocks.\1.mlp.fc2."),
    (r"dpt\.encoder\.layer\.(\d+)\.layernorm_before\.", _VIT + r"blocks.\1.norm1."),
    (r"dpt\.encoder\.layer\.(\d+)\.layernorm_after\.", _VIT + r"blocks.\1.norm2."),
    (r"dpt\.layernorm\.", _VIT + "norm."),
    (r"neck\.reassemble_stage\.readout_projects\.2\.0\.", "model.pretrained.act_postprocess3.0.project.0."),
    (r"neck\.reassemble_stage\.readout_projects\.3\.0\.", "model.pretrained.act_postprocess4.0.project.0."),
    (r"neck\.reassemble_stage\.layers\.2\.projection\.", "model.pretrained.act_postprocess3.3."),
    (r"neck\.reassemble_stage\.layers\.3\.projection\.", "model.pretrained.act_postprocess4.3."),
    (r"neck\.reassemble_stage\.layers\.3\.resize\.", "model.pretrained.act_postprocess4.4."),
    (r"head\.head\.", "model.scratch.output_conv."),
)
_CONVS = re.compile(r"neck\.convs\.(\d)\.(.*)")
_FUSION = re.compile(r"neck\.fusion_stage\.layers\.(\d)\.(.*)")
_QKV = re.compile(r"dpt\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")
_FUSION_PARTS = {
    "projection": "out_conv",
    "residual_layer1": "resConfUnit1",
    "residual_layer2": "resConfUnit2",
}


def _rename(key: str) -> str:
    if m := _CONVS.fullmatch(key):
        return f"model.scratch.layer{int(m.group(1)) + 1}_rn.{m.group(2)}"
    if m := _FUSION.fullmatch(key):
        part, rest = m.group(2).split(".", 1)
        rest = rest.replace("convolution1", "conv1").replace("convolution2", "conv2")
        return f"model.scratch.refinenet{4 - int(m.group(1))}.{_FUSION_PARTS[part]}.{rest}"
    for pattern, replacement in _RENAMES:
        new, n = re.subn("^" + pattern, replacement, key)
        if n:
            return new
    raise KeyError(f"unknown DPT-hybrid tensor {key!r}")


def midas_from_transformers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers ``DPTForDepthEstimation`` (hybrid) keys -> the reference's (no ``depth_model.``)."""
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if m := _QKV.fullmatch(key):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        else:
            out[_rename(key)] = value
    for (layer, kind), parts in qkv.items():
        if parts.keys() != {"query", "key", "value"}:
            raise KeyError(f"layer {layer}'s attention {kind} lacks one of query/key/value")
        out[f"{_VIT}blocks.{layer}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]]
        )
    return out
