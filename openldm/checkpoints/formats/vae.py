"""How the KL autoencoder is laid out on disk: original <-> diffusers key maps and configs.

Our layout is the original single-file one without the ``first_stage_model.`` prefix. Diffusers
differs in three ways: module names (``down_blocks.i.resnets.j``, ``mid_block.attentions.0``,
``conv_norm_out``...), decoder levels numbered from the lowest resolution up (diffusers'
``up_blocks.0`` is the original ``decoder.up.{n-1}``), and the mid-block attention projections
stored as linear ``[C, C]`` weights where the original has 1x1 convs ``[C, C, 1, 1]``. Folders
written by diffusers before 0.14 name those projections ``query/key/value/proj_attn``.

Every function here is pure over dicts of tensors; nothing is copied or cast.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor

from openldm.config import VAEConfig

# Mid-block attention: our 1x1 conv name -> diffusers' linear names, current first, then legacy.
_ATTN_NAMES: dict[str, tuple[str, ...]] = {
    "norm": ("group_norm",),
    "q": ("to_q", "query"),
    "k": ("to_k", "key"),
    "v": ("to_v", "value"),
    "proj_out": ("to_out.0", "proj_attn"),
}
_PROJECTIONS = ("q", "k", "v", "proj_out")
_RESNET_PARTS = ("norm1", "conv1", "norm2", "conv2")
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "act_fn": "silu",
    "norm_num_groups": 32,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


def _resnet(ours: str, theirs: str, has_shortcut: bool) -> Iterator[tuple[str, str]]:
    for part in _RESNET_PARTS:
        yield f"{ours}.{part}", f"{theirs}.{part}"
    if has_shortcut:
        yield f"{ours}.nin_shortcut", f"{theirs}.conv_shortcut"


def _mid(ours: str, theirs: str) -> Iterator[tuple[str, str]]:
    yield from _resnet(f"{ours}.block_1", f"{theirs}.resnets.0", False)
    yield from _resnet(f"{ours}.block_2", f"{theirs}.resnets.1", False)


def _module_pairs(config: VAEConfig) -> Iterator[tuple[str, str]]:
    """(our module, diffusers module) for every module with a weight and bias, attention excluded."""
    widths = [config.ch * m for m in config.ch_mult]
    levels = len(widths)
    yield "encoder.conv_in", "encoder.conv_in"
    cin = config.ch
    for i, cout in enumerate(widths):
        for j in range(config.num_res_blocks):
            has_shortcut = j == 0 and cin != cout
            yield from _resnet(
                f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", has_shortcut
            )
        if i != levels - 1:
            yield f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"
        cin = cout
    yield from _mid("encoder.mid", "encoder.mid_block")
    yield "encoder.norm_out", "encoder.conv_norm_out"
    yield "encoder.conv_out", "encoder.conv_out"
    yield "quant_conv", "quant_conv"
    yield "post_quant_conv", "post_quant_conv"
    yield "decoder.conv_in", "decoder.conv_in"
    yield from _mid("decoder.mid", "decoder.mid_block")
    cin = widths[-1]
    for i in reversed(range(levels)):
        cout = widths[i]
        theirs = f"decoder.up_blocks.{levels - 1 - i}"
        for j in range(config.num_res_blocks + 1):
            has_shortcut = j == 0 and cin != cout
            yield from _resnet(f"decoder.up.{i}.block.{j}", f"{theirs}.resnets.{j}", has_shortcut)
        if i != 0:
            yield f"decoder.up.{i}.upsample.conv", f"{theirs}.upsamplers.0.conv"
        cin = cout
    yield "decoder.norm_out", "decoder.conv_norm_out"
    yield "decoder.conv_out", "decoder.conv_out"


def _take(sd: Mapping[str, Tensor], names: tuple[str, ...], used: set[str]) -> Tensor:
    for name in names:
        if name in sd:
            used.add(name)
            return sd[name]
    raise KeyError(
        f"diffusers VAE state dict has no {' or '.join(names)}; is it an AutoencoderKL built for this config?"
    )


def _check_all_used(sd: Mapping[str, Tensor], used: set[str], where: str) -> None:
    unused = sorted(set(sd) - used)
    if unused:
        shown = ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else "")
        raise KeyError(f"{len(unused)} unexpected key(s) in the {where} VAE state dict: {shown}")


def vae_from_diffusers(sd: Mapping[str, Tensor], config: VAEConfig) -> dict[str, Tensor]:
    """A diffusers ``AutoencoderKL`` state dict -> ours (original keys, no prefix).

    Raises ``KeyError`` on a missing or unexpected key.
    """
    used: set[str] = set()
    out: dict[str, Tensor] = {}
    for ours, theirs in _module_pairs(config):
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = _take(sd, (f"{theirs}.{p}",), used)
    for part in ("encoder", "decoder"):
        for ours_name, their_names in _ATTN_NAMES.items():
            for p in ("weight", "bias"):
                names = tuple(f"{part}.mid_block.attentions.0.{n}.{p}" for n in their_names)
                tensor = _take(sd, names, used)
                if ours_name in _PROJECTIONS and p == "weight" and tensor.ndim == 2:
                    tensor = tensor.reshape(*tensor.shape, 1, 1)
                out[f"{part}.mid.attn_1.{ours_name}.{p}"] = tensor
    _check_all_used(sd, used, "diffusers")
    return out


def vae_to_diffusers(sd: Mapping[str, Tensor], config: VAEConfig) -> dict[str, Tensor]:
    """Our VAE state dict -> the current diffusers ``AutoencoderKL`` layout (``to_q``, linear weights)."""
    used: set[str] = set()
    out: dict[str, Tensor] = {}
    for ours, theirs in _module_pairs(config):
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = _take_ours(sd, f"{ours}.{p}", used)
    for part in ("encoder", "decoder"):
        for ours_name, their_names in _ATTN_NAMES.items():
            for p in ("weight", "bias"):
                tensor = _take_ours(sd, f"{part}.mid.attn_1.{ours_name}.{p}", used)
                if ours_name in _PROJECTIONS and p == "weight":
                    tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
                out[f"{part}.mid_block.attentions.0.{their_names[0]}.{p}"] = tensor
    _check_all_used(sd, used, "openldm")
    return out


def _take_ours(sd: Mapping[str, Tensor], name: str, used: set[str]) -> Tensor:
    if name not in sd:
        raise KeyError(f"VAE state dict has no {name!r}; is it an original-layout VAE built for this config?")
    used.add(name)
    return sd[name]


def vae_config_from_diffusers(config_json: Mapping[str, Any]) -> VAEConfig:
    """A diffusers ``vae/config.json`` dict -> :class:`VAEConfig`.

    Raises ``ValueError`` for an autoencoder this architecture cannot represent.
    """
    class_name = config_json.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise ValueError(f"expected a diffusers AutoencoderKL config, got _class_name={class_name!r}")
    for key, expected in _DIFFUSERS_DEFAULTS.items():
        value = config_json.get(key, expected)
        if value != expected:
            raise ValueError(
                f"unsupported diffusers VAE config: {key}={value!r} (only {expected!r} is supported)"
            )
    for key in ("shift_factor", "latents_mean", "latents_std"):
        if config_json.get(key) not in (None, 0, 0.0):
            raise ValueError(
                f"unsupported diffusers VAE config: {key}={config_json[key]!r} (SD VAEs have none)"
            )
    if "block_out_channels" not in config_json:
        raise ValueError("diffusers VAE config has no 'block_out_channels'")
    widths = [int(w) for w in config_json["block_out_channels"]]
    levels = len(widths)
    down = tuple(config_json.get("down_block_types", ("DownEncoderBlock2D",) * levels))
    up = tuple(config_json.get("up_block_types", ("UpDecoderBlock2D",) * levels))
    if down != ("DownEncoderBlock2D",) * levels or up != ("UpDecoderBlock2D",) * levels:
        raise ValueError(
            f"unsupported diffusers VAE block types {down} / {up}: expected {levels} DownEncoderBlock2D "
            f"and {levels} UpDecoderBlock2D (one per block_out_channels entry)"
        )
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first width {ch}")
    latent = int(config_json.get("latent_channels", 4))
    return VAEConfig(
        in_channels=int(config_json.get("in_channels", 3)),
        out_ch=int(config_json.get("out_channels", 3)),
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=int(config_json.get("layers_per_block", 1)),
        z_channels=latent,
        embed_dim=latent,
        scale_factor=float(config_json.get("scaling_factor", 0.18215)),
    )


def vae_config_to_diffusers(config: VAEConfig) -> dict[str, Any]:
    """:class:`VAEConfig` -> a diffusers ``AutoencoderKL`` ``config.json`` dict."""
    if config.embed_dim != config.z_channels:
        raise ValueError(
            f"diffusers' AutoencoderKL has one latent width; embed_dim {config.embed_dim} != "
            f"z_channels {config.z_channels} cannot be represented"
        )
    if config.ch_mult[0] != 1:
        # The original encoder's conv_in gives ``ch`` channels and its first block widens them;
        # diffusers' conv_in gives the first level's width directly.
        raise ValueError(
            f"diffusers' AutoencoderKL cannot represent ch_mult {config.ch_mult}: its first level must "
            f"keep conv_in's width, so ch_mult must start with 1 (e.g. ch={config.ch * config.ch_mult[0]} "
            "and the other multipliers divided by the first)"
        )
    levels = len(config.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": config.in_channels,
        "out_channels": config.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks,
        "latent_channels": config.z_channels,
        "scaling_factor": config.scale_factor,
        **_DIFFUSERS_DEFAULTS,
    }


def _indices(keys: list[str], pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return sorted(found)


def _shape(sd: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"not an original-layout SD VAE state dict: missing {key!r}")
    return tuple(sd[key].shape)


def infer_vae_config(sd: Mapping[str, Tensor], scale_factor: float) -> VAEConfig:
    """Read a :class:`VAEConfig` off an original-layout VAE state dict (keys without a prefix).

    ``scale_factor`` is not stored in the weights, so the caller supplies it.
    """
    keys = list(sd)
    if any(k.startswith("first_stage_model.") for k in keys):
        raise ValueError(
            "strip the 'first_stage_model.' prefix from the keys before inferring the VAE config"
        )
    conv_in = _shape(sd, "encoder.conv_in.weight")
    ch, in_channels = conv_in[0], conv_in[1]
    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise ValueError(f"VAE state dict has encoder levels {levels}, expected 0..n-1")
    blocks = _indices(keys, r"encoder\.down\.0\.block\.(\d+)\.")
    if any(re.match(r"(en|de)coder\.(down|up)\.\d+\.attn\.", k) for k in keys):
        raise ValueError("VAE with attention inside its levels (attn_resolutions) is not supported")
    ch_mult = tuple(_shape(sd, f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in levels)
    z_channels = _shape(sd, "decoder.conv_in.weight")[1]
    encoder_out = _shape(sd, "encoder.conv_out.weight")[0]
    if encoder_out != 2 * z_channels:
        raise ValueError(
            f"encoder.conv_out has {encoder_out} channels, expected 2 * z_channels = {2 * z_channels}"
        )
    decoder_blocks = _indices(keys, r"decoder\.up\.0\.block\.(\d+)\.")
    if len(decoder_blocks) != len(blocks) + 1:
        raise ValueError(
            f"decoder levels have {len(decoder_blocks)} blocks, "
            f"expected num_res_blocks + 1 = {len(blocks) + 1}"
        )
    return VAEConfig(
        in_channels=in_channels,
        out_ch=_shape(sd, "decoder.conv_out.weight")[0],
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=len(blocks),
        z_channels=z_channels,
        embed_dim=_shape(sd, "post_quant_conv.weight")[1],
        scale_factor=scale_factor,
    )
