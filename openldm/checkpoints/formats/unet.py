"""The UNet in the diffusers layout: key maps, config translation and config inference.

Our module tree uses the original (``ldm``) key names, so original checkpoints need no map; this
module translates to and from diffusers' ``UNet2DConditionModel`` names:

================================  ==========================================
original (ours)                   diffusers
================================  ==========================================
``time_embed.0`` / ``.2``         ``time_embedding.linear_1`` / ``linear_2``
``label_emb``                     ``class_embedding`` (``num_class_embeds``)
``label_emb.0.0`` / ``.0.2``      ``class_embedding.linear_1`` / ``linear_2``
``input_blocks.0.0``              ``conv_in``
``input_blocks.N.0`` (ResBlock)   ``down_blocks.L.resnets.R``
``input_blocks.N.1``              ``down_blocks.L.attentions.R``
``input_blocks.N.0.op``           ``down_blocks.L.downsamplers.0.conv``
``middle_block.0`` / ``1`` / ``2``  ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``
``output_blocks.N.0``             ``up_blocks.B.resnets.R``
``output_blocks.N.1``             ``up_blocks.B.attentions.R``
``output_blocks.N.{1,2}.conv``    ``up_blocks.B.upsamplers.0.conv``
``out.0`` / ``out.2``             ``conv_norm_out`` / ``conv_out``
================================  ==========================================

Inside a ResBlock: ``in_layers.0/2`` = ``norm1``/``conv1``, ``emb_layers.1`` = ``time_emb_proj``,
``out_layers.0/3`` = ``norm2``/``conv2``, ``skip_connection`` = ``conv_shortcut``. Inside a
transformer the names are the same in both layouts. Both layouts store ``proj_in``/``proj_out`` as a
1x1 conv for SD 1 and as a linear layer for SD 2 (diffusers' ``use_linear_projection``), so no
reshape is needed between matching configs; a tensor whose layout disagrees with the config (a
1x1 conv where a linear layer is configured, or the reverse) is reshaped to what the config says.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from openldm.config import UNetConfig

_RESNET_OURS_TO_DIFFUSERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_DIFFUSERS_TO_OURS = {v: k for k, v in _RESNET_OURS_TO_DIFFUSERS.items()}
_TOP_OURS_TO_DIFFUSERS = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "class_embedding.linear_1",
    "label_emb.0.2": "class_embedding.linear_2",
    "label_emb": "class_embedding",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_TOP_DIFFUSERS_TO_OURS = {v: k for k, v in _TOP_OURS_TO_DIFFUSERS.items()}
_MIDDLE = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}
_MIDDLE_REVERSE = {v: k for k, v in _MIDDLE.items()}


class UnsupportedUNetError(ValueError):
    """A configuration or state dict that :class:`~openldm.config.UNetConfig` cannot represent."""


def _has_attention(config: UNetConfig, level: int) -> bool:
    return 2**level in config.attention_resolutions


def _map_resnet(rest: str, table: Mapping[str, str], key: str) -> str:
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    raise KeyError(f"unknown ResBlock parameter in UNet key {key!r}")


def _top_level(key: str, table: Mapping[str, str]) -> str | None:
    # Longest prefix first so that "label_emb.0.0" wins over "label_emb".
    for old in sorted(table, key=len, reverse=True):
        if key.startswith(old + "."):
            return table[old] + key[len(old) :]
    return None


def unet_key_to_diffusers(key: str, config: UNetConfig) -> str:
    top = _top_level(key, _TOP_OURS_TO_DIFFUSERS)
    if top is not None:
        return top
    per_level = config.num_res_blocks + 1
    n_levels = len(config.channel_mult)
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", key):
        n, j, rest = int(m[1]), m[2], m[3]
        level, r = divmod(n - 1, per_level)
        if n >= 1 and level < n_levels:
            if r == config.num_res_blocks and j == "0" and rest.startswith("op."):
                return f"down_blocks.{level}.downsamplers.0.conv{rest[2:]}"
            if r < config.num_res_blocks and j == "0":
                return f"down_blocks.{level}.resnets.{r}.{_map_resnet(rest, _RESNET_OURS_TO_DIFFUSERS, key)}"
            if r < config.num_res_blocks and j == "1" and _has_attention(config, level):
                return f"down_blocks.{level}.attentions.{r}.{rest}"
    elif m := re.fullmatch(r"middle_block\.(\d+)\.(.+)", key):
        j, rest = m[1], m[2]
        if j in ("0", "2"):
            return f"{_MIDDLE[j]}.{_map_resnet(rest, _RESNET_OURS_TO_DIFFUSERS, key)}"
        if j == "1":
            return f"{_MIDDLE[j]}.{rest}"
    elif m := re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", key):
        n, j, rest = int(m[1]), int(m[2]), m[3]
        block, r = divmod(n, per_level)
        level = n_levels - 1 - block
        attention = _has_attention(config, level)
        if level >= 0:
            if j == 0:
                return f"up_blocks.{block}.resnets.{r}.{_map_resnet(rest, _RESNET_OURS_TO_DIFFUSERS, key)}"
            if j == 1 and attention:
                return f"up_blocks.{block}.attentions.{r}.{rest}"
            if j == 1 + attention and r == config.num_res_blocks and level > 0 and rest.startswith("conv."):
                return f"up_blocks.{block}.upsamplers.0.{rest}"
    raise KeyError(f"UNet key {key!r} does not belong to a UNet of this configuration")


def _key_from_diffusers(key: str, config: UNetConfig) -> str:
    top = _top_level(key, _TOP_DIFFUSERS_TO_OURS)
    if top is not None:
        return top
    per_level = config.num_res_blocks + 1
    n_levels = len(config.channel_mult)
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key):
        level, kind, r, rest = int(m[1]), m[2], int(m[3]), m[4]
        if level < n_levels:
            base = 1 + level * per_level
            if kind == "resnets" and r < config.num_res_blocks:
                return f"input_blocks.{base + r}.0.{_map_resnet(rest, _RESNET_DIFFUSERS_TO_OURS, key)}"
            if kind == "attentions" and r < config.num_res_blocks and _has_attention(config, level):
                return f"input_blocks.{base + r}.1.{rest}"
            if kind == "downsamplers" and r == 0 and level < n_levels - 1 and rest.startswith("conv."):
                return f"input_blocks.{base + config.num_res_blocks}.0.op{rest[4:]}"
    elif m := re.fullmatch(r"(mid_block\.(?:resnets|attentions)\.\d+)\.(.+)", key):
        j, rest = _MIDDLE_REVERSE.get(m[1]), m[2]
        if j in ("0", "2"):
            return f"middle_block.{j}.{_map_resnet(rest, _RESNET_DIFFUSERS_TO_OURS, key)}"
        if j == "1":
            return f"middle_block.1.{rest}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key):
        block, kind, r, rest = int(m[1]), m[2], int(m[3]), m[4]
        level = n_levels - 1 - block
        attention = _has_attention(config, level)
        if level >= 0:
            base = block * per_level
            if kind == "resnets" and r < per_level:
                return f"output_blocks.{base + r}.0.{_map_resnet(rest, _RESNET_DIFFUSERS_TO_OURS, key)}"
            if kind == "attentions" and r < per_level and attention:
                return f"output_blocks.{base + r}.1.{rest}"
            if kind == "upsamplers" and r == 0 and level > 0 and rest.startswith("conv."):
                return f"output_blocks.{base + config.num_res_blocks}.{1 + attention}.{rest}"
    raise KeyError(f"diffusers UNet key {key!r} does not belong to a UNet of this configuration")


def _fit_projection(key: str, tensor: torch.Tensor, config: UNetConfig) -> torch.Tensor:
    """Give a transformer's proj_in/proj_out weight the layout (linear or 1x1 conv) of the config."""
    if not re.search(r"\.proj_(in|out)\.weight$", key):
        return tensor
    if config.use_linear_in_transformer and tensor.ndim == 4:
        return tensor[:, :, 0, 0]
    if not config.use_linear_in_transformer and tensor.ndim == 2:
        return tensor[:, :, None, None]
    return tensor


def unet_to_diffusers(sd: Mapping[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """Rename an original-layout UNet state dict (no prefix) to diffusers' names.

    Raises ``KeyError`` on a key that has no place in a UNet of ``config``.
    """
    return {unet_key_to_diffusers(k, config): _fit_projection(k, v, config) for k, v in sd.items()}


def unet_from_diffusers(sd: Mapping[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``UNet2DConditionModel`` state dict to the original (our) names.

    Raises ``KeyError`` on a key that has no place in a UNet of ``config``.
    """
    out = {}
    for key, value in sd.items():
        new = _key_from_diffusers(key, config)
        out[new] = _fit_projection(new, value, config)
    return out


# --- configs -------------------------------------------------------------------------------------

# diffusers options that must keep these values for the model to be the reference UNet.
_DIFFUSERS_FIXED: dict[str, Any] = {
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "center_input_sample": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "dual_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "class_embeddings_concat": False,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "attention_type": "default",
}
# diffusers options that must be unset (None) or absent.
_DIFFUSERS_UNSET = (
    "num_attention_heads",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "time_embedding_dim",
    "time_embedding_act_fn",
    "timestep_post_act",
    "time_cond_proj_dim",
    "cross_attention_norm",
    "reverse_transformer_layers_per_block",
)
_CROSS_DOWN, _PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"


def _prefers_head_count(use_linear: bool, num_classes: object) -> bool:
    """The head rule when weights (or both readings of a config) cannot tell: see infer_unet_config."""
    return not use_linear or isinstance(num_classes, int)


def _per_level(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UnsupportedUNetError(f"diffusers {name} has {len(value)} entries for {n} blocks")
        return list(value)
    return [value] * n


def _single(value: Any, n: int, name: str) -> Any:
    values = _per_level(value, n, name)
    if any(v != values[0] for v in values):
        raise UnsupportedUNetError(
            f"diffusers {name}={value!r} varies per block; the reference UNet has one value"
        )
    return values[0]


def unet_config_from_diffusers(config_json: Mapping[str, Any]) -> UNetConfig:
    """A :class:`UNetConfig` from a diffusers ``UNet2DConditionModel`` ``config.json`` dict.

    diffusers' ``attention_head_dim`` is really the number of heads per block (a long-standing
    naming issue): SD 2's ``[5, 10, 20, 20]`` means 64-wide heads. The per-level head counts become
    ``num_heads`` when constant or ``num_head_channels`` when the width is constant; when both
    readings fit, the rule of :func:`infer_unet_config` decides. Raises
    :class:`UnsupportedUNetError` on anything the reference UNet cannot represent.
    """
    c = dict(config_json)
    name = c.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
        raise UnsupportedUNetError(f"expected a UNet2DConditionModel config, got {name!r}")
    for key, value in _DIFFUSERS_FIXED.items():
        if key in c and c[key] != value:
            raise UnsupportedUNetError(f"diffusers {key}={c[key]!r} is not supported (only {value!r})")
    for key in _DIFFUSERS_UNSET:
        if c.get(key) is not None:
            raise UnsupportedUNetError(f"diffusers {key}={c[key]!r} is not supported (only None)")

    down = list(c.get("down_block_types", (_CROSS_DOWN,) * 3 + (_PLAIN_DOWN,)))
    up = list(c.get("up_block_types", (_PLAIN_UP,) + (_CROSS_UP,) * 3))
    n = len(down)
    if any(t not in (_CROSS_DOWN, _PLAIN_DOWN) for t in down):
        raise UnsupportedUNetError(f"unsupported down_block_types {down}")
    expected_up = [_CROSS_UP if t == _CROSS_DOWN else _PLAIN_UP for t in reversed(down)]
    if up != expected_up:
        raise UnsupportedUNetError(f"up_block_types {up} do not mirror down_block_types {down}")
    attention_levels = [i for i, t in enumerate(down) if t == _CROSS_DOWN]

    block_out = [int(v) for v in c.get("block_out_channels", (320, 640, 1280, 1280))]
    if len(block_out) != n:
        raise UnsupportedUNetError(f"{len(block_out)} block_out_channels for {n} down blocks")
    model_channels = block_out[0]
    if any(ch % model_channels for ch in block_out):
        raise UnsupportedUNetError(f"block_out_channels {block_out} are not multiples of the first")
    channel_mult = tuple(ch // model_channels for ch in block_out)

    num_res_blocks = int(_single(c.get("layers_per_block", 2), n, "layers_per_block"))
    depth = int(_single(c.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block"))
    context_dim = int(_single(c.get("cross_attention_dim", 1280), n, "cross_attention_dim"))
    use_linear = bool(c.get("use_linear_projection", False))

    only_cross = [
        bool(v) for v in _per_level(c.get("only_cross_attention", False), n, "only_cross_attention")
    ]
    disable_self_attentions = tuple(only_cross) if any(only_cross) else None

    class_embed_type = c.get("class_embed_type")
    num_class_embeds = c.get("num_class_embeds")
    num_classes: int | str | None = None
    adm_in_channels = None
    if class_embed_type is None and num_class_embeds is not None:
        num_classes = int(num_class_embeds)
    elif class_embed_type == "projection":
        if num_class_embeds is not None:
            raise UnsupportedUNetError("both num_class_embeds and class_embed_type='projection' are set")
        adm_in_channels = c.get("projection_class_embeddings_input_dim")
        if adm_in_channels is None:
            raise UnsupportedUNetError(
                "class_embed_type='projection' needs projection_class_embeddings_input_dim"
            )
        num_classes, adm_in_channels = "sequential", int(adm_in_channels)
    elif class_embed_type is not None:
        raise UnsupportedUNetError(f"class_embed_type={class_embed_type!r} is not supported")

    # Head counts: the attention levels, plus the middle block (which takes the last entry).
    heads = [int(h) for h in _per_level(c.get("attention_head_dim", 8), n, "attention_head_dim")]
    used = [(block_out[i], heads[i]) for i in attention_levels] + [(block_out[-1], heads[-1])]
    if any(ch % h for ch, h in used):
        raise UnsupportedUNetError(
            f"attention_head_dim {heads} does not divide block_out_channels {block_out}"
        )
    same_count = len({h for _, h in used}) == 1
    same_width = len({ch // h for ch, h in used}) == 1
    if same_count and (not same_width or _prefers_head_count(use_linear, num_classes)):
        num_heads, num_head_channels = used[0][1], None
    elif same_width:
        num_heads, num_head_channels = None, used[0][0] // used[0][1]
    else:
        raise UnsupportedUNetError(
            f"attention_head_dim {heads} gives neither a fixed head count nor a fixed head width"
        )

    return UNetConfig(
        in_channels=int(c.get("in_channels", 4)),
        out_channels=int(c.get("out_channels", 4)),
        model_channels=model_channels,
        channel_mult=channel_mult,
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(2**i for i in attention_levels),
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        transformer_depth=depth,
        context_dim=context_dim,
        use_linear_in_transformer=use_linear,
        disable_self_attentions=disable_self_attentions,
        num_classes=num_classes,  # type: ignore[arg-type]
        adm_in_channels=adm_in_channels,
        upcast_attention=bool(c.get("upcast_attention", False)),
    )


def unet_config_to_diffusers(config: UNetConfig) -> dict[str, Any]:
    """The diffusers ``UNet2DConditionModel`` config (``config.json`` contents) of ``config``."""
    n = len(config.channel_mult)
    block_out = [config.model_channels * m for m in config.channel_mult]
    attention = [_has_attention(config, level) for level in range(n)]
    extra = set(config.attention_resolutions) - {2**level for level in range(n)}
    if extra:
        raise UnsupportedUNetError(f"attention_resolutions {sorted(extra)} name no level of this UNet")
    disable = config.disable_self_attentions or (False,) * n
    out: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "block_out_channels": block_out,
        "layers_per_block": config.num_res_blocks,
        "down_block_types": [_CROSS_DOWN if a else _PLAIN_DOWN for a in attention],
        "up_block_types": [_CROSS_UP if a else _PLAIN_UP for a in reversed(attention)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        # diffusers' attention_head_dim is the number of heads.
        "attention_head_dim": [config.heads_for(ch)[0] for ch in block_out],
        "transformer_layers_per_block": config.transformer_depth,
        "cross_attention_dim": config.context_dim,
        "use_linear_projection": config.use_linear_in_transformer,
        "only_cross_attention": list(disable),
        "upcast_attention": config.upcast_attention,
        **_DIFFUSERS_FIXED,
    }
    if isinstance(config.num_classes, int):
        out["num_class_embeds"] = config.num_classes
    elif config.num_classes == "sequential":
        out["class_embed_type"] = "projection"
        out["projection_class_embeddings_input_dim"] = config.adm_in_channels
    return out


# --- inference from weights -----------------------------------------------------------------------


def infer_unet_config(sd: Mapping[str, torch.Tensor]) -> UNetConfig:
    """Read a :class:`UNetConfig` from an original-layout UNet state dict (no key prefix).

    Sizes, levels, attention levels, transformer depth, context width, linear vs conv projections
    and class conditioning are read from key names and shapes. What the weights cannot show is
    fixed by these rules:

    - Heads: the head count is invisible in weights. Conv ``proj_in`` (SD 1 style) ->
      ``num_heads=8``; linear ``proj_in`` with an integer class embedding (the x4 upscaler) ->
      ``num_heads=8``; any other linear ``proj_in`` (SD 2 family) -> ``num_head_channels=64``.
    - ``upcast_attention`` is set for the SD 2 family, i.e. linear ``proj_in`` and no integer class
      embedding (the x4 upscaler's diffusers config and our preset do not upcast).
    - ``disable_self_attentions``: a level's first attention attends to the context when its
      ``attn1.to_k`` input width is the context width and differs from the level's width (when
      the two widths are equal the weights cannot tell and self-attention is assumed). Levels
      without attention take the value of the nearest level with attention; all False -> None.
    - ``attention_resolutions`` lists the levels with attention in increasing order.

    Raises :class:`UnsupportedUNetError` on a layout the reference UNet with this config cannot
    have (scale-shift norm, ResBlock up/downsampling, attention on only some blocks of a level, ...).
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise UnsupportedUNetError(f"UNet state dict has no {key!r}")
        return tuple(sd[key].shape)

    out_ch, in_channels = shape("input_blocks.0.0.weight")[:2]
    model_channels = out_ch
    # A ControlNet's encoder has no output layer: its width is the input's.
    out_channels = shape("out.2.weight")[0] if "out.2.weight" in sd else in_channels
    input_ids = {int(m[1]) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.", k))}
    downs = sorted(int(m[1]) for k in sd if (m := re.fullmatch(r"input_blocks\.(\d+)\.0\.op\.weight", k)))
    n_levels = len(downs) + 1
    n_blocks = len(input_ids) - 1
    if n_blocks <= 0 or (n_blocks - len(downs)) % n_levels:
        raise UnsupportedUNetError(f"{n_blocks} input blocks do not form {n_levels} equal levels")
    num_res_blocks = (n_blocks - len(downs)) // n_levels
    per_level = num_res_blocks + 1
    if downs != [1 + level * per_level + num_res_blocks for level in range(n_levels - 1)]:
        raise UnsupportedUNetError("downsampling blocks are not plain strided convs at the level ends")

    mid = "middle_block.1"
    linear = len(shape(f"{mid}.proj_in.weight")) == 2
    context_dim = shape(f"{mid}.transformer_blocks.0.attn2.to_k.weight")[1]
    depth = len({int(m[1]) for k in sd if (m := re.match(rf"{mid}\.transformer_blocks\.(\d+)\.", k))})
    if shape("middle_block.0.emb_layers.1.weight")[0] != shape("middle_block.0.in_layers.2.weight")[0]:
        raise UnsupportedUNetError("ResBlocks with scale-shift norm (use_scale_shift_norm) are not supported")
    mid_ch = shape(f"{mid}.norm.weight")[0]
    if shape(f"{mid}.transformer_blocks.0.attn1.to_k.weight")[1] != mid_ch:
        raise UnsupportedUNetError("a middle block without self-attention is not supported")

    channel_mult = []
    attention: list[bool] = []
    disabled: list[bool | None] = []
    for level in range(n_levels):
        blocks = [1 + level * per_level + r for r in range(num_res_blocks)]
        width = shape(f"input_blocks.{blocks[0]}.0.out_layers.3.weight")[0]
        if width % model_channels:
            raise UnsupportedUNetError(f"level {level} width {width} is not a multiple of {model_channels}")
        channel_mult.append(width // model_channels)
        has = [f"input_blocks.{b}.1.norm.weight" in sd for b in blocks]
        if len(set(has)) != 1:
            raise UnsupportedUNetError(f"level {level} has attention on only some of its blocks")
        attention.append(has[0])
        if has[0]:
            to_k = shape(f"input_blocks.{blocks[0]}.1.transformer_blocks.0.attn1.to_k.weight")[1]
            disabled.append(to_k == context_dim and to_k != width)
        else:
            disabled.append(None)

    attention_levels = [level for level, a in enumerate(attention) if a]
    filled = []
    for level, value in enumerate(disabled):
        if value is None:
            nearest = min(attention_levels, key=lambda a: abs(a - level), default=None)
            value = bool(nearest is not None and disabled[nearest])
        filled.append(value)

    num_classes: int | str | None = None
    adm_in_channels = None
    if "label_emb.weight" in sd:
        num_classes = shape("label_emb.weight")[0]
    elif "label_emb.0.0.weight" in sd:
        num_classes, adm_in_channels = "sequential", shape("label_emb.0.0.weight")[1]
    elif any(k.startswith("label_emb.") for k in sd):
        raise UnsupportedUNetError("unsupported label_emb layout (only an embedding or label_emb.0.0/0.2)")

    if _prefers_head_count(linear, num_classes):
        num_heads, num_head_channels = 8, None
    else:
        num_heads, num_head_channels = None, 64
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(2**level for level in attention_levels),
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        transformer_depth=depth,
        context_dim=context_dim,
        use_linear_in_transformer=linear,
        disable_self_attentions=tuple(filled) if any(filled) else None,
        num_classes=num_classes,  # type: ignore[arg-type]
        adm_in_channels=adm_in_channels,
        upcast_attention=linear and not isinstance(num_classes, int),
    )
