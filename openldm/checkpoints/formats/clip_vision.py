"""How the CLIP image tower is laid out on disk: key maps, config translation and inference.

Our layout (:class:`openldm.nn.clip_vision.CLIPVisionEncoder`) is the original one of OpenCLIP's and
OpenAI CLIP's ``visual`` module, so an original single file needs only its prefix stripped:
``embedder.model.visual.*`` in both unCLIP files (``FrozenOpenCLIPImageEmbedder`` for -h,
``ClipImageEmbedder`` holding a whole OpenAI CLIP model for -l; the text tower next to it is not used).
A diffusers folder holds transformers' ``CLIPVisionModelWithProjection`` (``image_encoder/``): separate
q/k/v projections, ``pre_layrnorm``, ``post_layernorm`` and a ``visual_projection`` Linear (the
transpose of ``proj``).

Head counts are not visible in the weights: 80-wide heads for OpenCLIP ViT-H/14 (width 1280), 64-wide
otherwise (OpenAI ViT-L/14 and the tiny test towers). The activation is not visible either: GELU for
OpenCLIP (an image embedder without a text tower), quick-GELU for OpenAI CLIP (1024 wide; its
embedder keeps its text tower, ``model.transformer.*``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from openldm.nn.clip_vision import VisionConfig

StateDict = dict[str, torch.Tensor]

ORIGINAL_PREFIX = "model.visual."  # inside the single file's ``embedder.`` component
HF_PREFIX = "vision_model."
_HF_TOP = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
_HF_BLOCK = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.")
_HF_IGNORED = ("vision_model.embeddings.position_ids",)
OPENCLIP_H_WIDTH = 1280
OPENAI_L_WIDTH = 1024
OPENCLIP_H_HEAD_WIDTH = 80
HEAD_WIDTH = 64


def vision_from_embedder(embedder: Mapping[str, torch.Tensor]) -> StateDict:
    """The image tower of a single file's ``embedder`` component (prefix already stripped)."""
    sd = {k[len(ORIGINAL_PREFIX) :]: v for k, v in embedder.items() if k.startswith(ORIGINAL_PREFIX)}
    if not sd:
        raise ValueError(f"the image embedder holds no {ORIGINAL_PREFIX}* tensors (the CLIP image tower)")
    return sd


def embedder_activation(embedder: Mapping[str, torch.Tensor]) -> str:
    """quick-GELU for OpenAI CLIP, GELU for OpenCLIP.

    OpenAI CLIP's embedder keeps its text tower (``model.transformer.*``) and ViT-L/14 is 1024 wide;
    OpenCLIP's image embedder drops the text transformer.
    """
    conv = embedder.get(ORIGINAL_PREFIX + "conv1.weight")
    openai_width = conv is not None and conv.shape[0] == OPENAI_L_WIDTH
    text_tower = any(k.startswith("model.transformer.") for k in embedder)
    return "quick_gelu" if text_tower or openai_width else "gelu"


def vision_from_transformers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers ``CLIPVisionModelWithProjection`` keys -> ours (q/k/v fused, projection transposed)."""
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in _HF_IGNORED:
            continue
        if key == "visual_projection.weight":
            out["proj"] = value.t().contiguous()
            continue
        if not key.startswith(HF_PREFIX):
            raise ValueError(f"unexpected image encoder tensor {key!r}")
        name = key[len(HF_PREFIX) :]
        if name in _HF_TOP:
            out[_HF_TOP[name]] = value
            continue
        match = _HF_LAYER.fullmatch(name)
        if match is None:
            raise ValueError(f"unexpected image encoder tensor {key!r}")
        index, module, kind = int(match[1]), match[2], match[3]
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((index, kind), {})[module[-6]] = value
        elif module in _HF_BLOCK:
            out[f"transformer.resblocks.{index}.{_HF_BLOCK[module]}.{kind}"] = value
        else:
            raise ValueError(f"unexpected image encoder tensor {key!r}")
    for (index, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"layer {index} lacks some of its q/k/v {kind} tensors")
        out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def vision_to_transformers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Ours -> transformers ``CLIPVisionModelWithProjection`` keys."""
    top = {ours: theirs for theirs, ours in _HF_TOP.items()}
    block = {ours: theirs for theirs, ours in _HF_BLOCK.items()}
    out: StateDict = {}
    for key, value in sd.items():
        if key == "proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif key in top:
            out[HF_PREFIX + top[key]] = value
        elif match := _RESBLOCK.match(key):
            prefix = f"{HF_PREFIX}encoder.layers.{match[1]}."
            rest = key[match.end() :]
            if rest.startswith("attn.in_proj_"):
                kind = rest.removeprefix("attn.in_proj_")
                for name, part in zip("qkv", value.chunk(3), strict=True):
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = part
            else:
                module, kind = rest.rsplit(".", 1)
                out[f"{prefix}{block[module]}.{kind}"] = value
        else:
            raise ValueError(f"unexpected tensor {key!r}")
    return out


def default_heads(width: int) -> int:
    head_width = OPENCLIP_H_HEAD_WIDTH if width == OPENCLIP_H_WIDTH else HEAD_WIDTH
    return max(1, width // head_width)


def infer_vision_config(sd: Mapping[str, torch.Tensor], activation: str) -> VisionConfig:
    """Sizes from our-layout weights (the activation and the head count are not visible in them)."""
    try:
        width, _, patch, _ = sd["conv1.weight"].shape
        tokens = sd["positional_embedding"].shape[0]
        embed_dim = sd["proj"].shape[1]
        mlp_width = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"the image encoder lacks {e.args[0]!r}") from None
    layers = 1 + max(int(m[1]) for k in sd if (m := _RESBLOCK.match(k)))
    grid = round((tokens - 1) ** 0.5)
    if grid * grid != tokens - 1:
        raise ValueError(f"positional_embedding has {tokens} rows, not a square grid plus a class token")
    return VisionConfig(
        width=width,
        layers=layers,
        heads=default_heads(width),
        mlp_width=mlp_width,
        patch_size=patch,
        image_size=grid * patch,
        embed_dim=embed_dim,
        activation=activation,  # type: ignore[arg-type]
    )


def vision_config_from_transformers(config: Mapping[str, Any]) -> VisionConfig:
    """Our config from a ``CLIPVisionModelWithProjection`` ``config.json``."""
    cfg = config.get("vision_config", config)  # a whole CLIPConfig nests it
    return VisionConfig(
        width=int(cfg["hidden_size"]),
        layers=int(cfg["num_hidden_layers"]),
        heads=int(cfg["num_attention_heads"]),
        mlp_width=int(cfg["intermediate_size"]),
        patch_size=int(cfg["patch_size"]),
        image_size=int(cfg["image_size"]),
        embed_dim=int(cfg.get("projection_dim", config.get("projection_dim", 512))),
        activation=cfg.get("hidden_act", "quick_gelu"),
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
    )


def vision_config_to_transformers(config: VisionConfig) -> dict[str, Any]:
    """``CLIPVisionConfig`` keyword arguments for ``config``."""
    return {
        "hidden_size": config.width,
        "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads,
        "intermediate_size": config.mlp_width,
        "patch_size": config.patch_size,
        "image_size": config.image_size,
        "projection_dim": config.embed_dim,
        "hidden_act": config.activation,
        "layer_norm_eps": config.layer_norm_eps,
        "num_channels": 3,
    }
