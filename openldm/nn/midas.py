"""The MiDaS DPT-hybrid depth estimator that the original depth checkpoint carries (``depth_model.*``).

A ResNet-50 stem (ResNetV2, no pre-activation, weight-standardised convs with TF "same" padding, group
norm) turns the image into 1/16-resolution features; a ViT-B/16 (384 training size, position embeddings
resized to the input) reads them as tokens; four features (the first two ResNet stages and two
transformer blocks, the latter "reassembled" into maps with their readout token projected in) are fused
coarse to fine by refinenet blocks; a small head predicts inverse relative depth at the input size
(larger is nearer, non-negative).

Module names follow the reference's keys (``ldm/modules/midas/midas/{dpt_depth,vit,blocks}.py`` around
timm's ``vit_base_resnet50_384``) without the ``depth_model.`` prefix, so its weights load with
``strict=True``: ``model.pretrained.model.patch_embed.backbone.stages.0.blocks.0.conv1.weight``,
``model.pretrained.act_postprocess3.3.weight``, ``model.scratch.refinenet4.resConfUnit2.conv1.weight``,
``model.scratch.output_conv.0.weight``... The ViT's ImageNet head (``model.pretrained.model.head``) is
stored in the checkpoint and kept here, unused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PREFIX = "model."
_BACKBONE = "model.pretrained.model."


@dataclass(frozen=True)
class MiDaSConfig:
    """Sizes of the DPT-hybrid estimator; the defaults are the released ``dpt_hybrid`` model's."""

    image_size: int = 384  # the position embeddings' grid is image_size // 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    hooks: tuple[int, int] = (8, 11)  # transformer blocks whose outputs are the 3rd and 4th features
    stem_width: int = 64
    stage_depths: tuple[int, ...] = (3, 4, 9)
    stage_widths: tuple[int, ...] = (256, 512, 1024)
    num_groups: int = 32
    features: int = 256
    num_classes: int = 1000  # the ViT's ImageNet head, stored in the reference's file; 0: none

    def __post_init__(self) -> None:
        if len(self.stage_depths) != 3 or len(self.stage_widths) != 3:
            raise ValueError("the hybrid backbone has 3 ResNet stages (overall stride 16)")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        if not 0 <= self.hooks[0] < self.hooks[1] < self.layers:
            raise ValueError(f"hooks {self.hooks} must be two increasing block indices below {self.layers}")

    @property
    def reassembled(self) -> tuple[int, int, int, int]:
        """Channels of the four features fed to the fusion blocks."""
        return (self.stage_widths[0], self.stage_widths[1], self.width, self.width)


# --- the ResNetV2 stem ---------------------------------------------------------------------------


def _same_pad(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow "SAME" padding: output size ceil(input / stride), the odd pixel on the bottom/right."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class StdConv2dSame(nn.Conv2d):
    """A bias-free convolution whose weight is standardised per output channel (eps 1e-8), "same" padded."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        flat = w.reshape(w.shape[0], -1)
        mean = flat.mean(dim=1, keepdim=True)
        var = flat.var(dim=1, unbiased=False, keepdim=True)
        w = ((flat - mean) * torch.rsqrt(var + 1e-8)).reshape_as(w)
        return F.conv2d(_same_pad(x, self.kernel_size[0], self.stride[0]), w, None, self.stride)


class GroupNormAct(nn.GroupNorm):
    def __init__(self, groups: int, channels: int, act: bool = True) -> None:
        super().__init__(groups, channels, eps=1e-5)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return F.relu(x) if self.act else x


class Stem(nn.Module):
    def __init__(self, c: MiDaSConfig) -> None:
        super().__init__()
        self.conv = StdConv2dSame(3, c.stem_width, 7, stride=2)
        self.norm = GroupNormAct(c.num_groups, c.stem_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return F.max_pool2d(_same_pad(x, 3, 2, value=float("-inf")), 3, stride=2)


class Downsample(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv = StdConv2dSame(cin, cout, 1, stride=stride)
        self.norm = GroupNormAct(groups, cout, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """1x1 down to a quarter of the width, 3x3 (strided), 1x1 up; residual, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        mid = cout // 4
        self.downsample = Downsample(cin, cout, stride, groups) if stride != 1 or cin != cout else None
        self.conv1 = StdConv2dSame(cin, mid, 1)
        self.norm1 = GroupNormAct(groups, mid)
        self.conv2 = StdConv2dSame(mid, mid, 3, stride=stride)
        self.norm2 = GroupNormAct(groups, mid)
        self.conv3 = StdConv2dSame(mid, cout, 1)
        self.norm3 = GroupNormAct(groups, cout, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x) if self.downsample is not None else x
        y = self.norm1(self.conv1(x))
        y = self.norm2(self.conv2(y))
        y = self.norm3(self.conv3(y))
        return F.relu(y + shortcut)


class Stage(nn.Module):
    def __init__(self, cin: int, cout: int, depth: int, stride: int, groups: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(
                Bottleneck(cin if i == 0 else cout, cout, stride if i == 0 else 1, groups)
                for i in range(depth)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetStem(nn.Module):
    """``patch_embed.backbone``: the stem and three stages (strides 4, 1, 2, 2)."""

    def __init__(self, c: MiDaSConfig) -> None:
        super().__init__()
        self.stem = Stem(c)
        widths = (c.stem_width, *c.stage_widths)
        self.stages = nn.ModuleList(
            Stage(widths[i], widths[i + 1], depth, 1 if i == 0 else 2, c.num_groups)
            for i, depth in enumerate(c.stage_depths)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every stage."""
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


class HybridEmbed(nn.Module):
    def __init__(self, c: MiDaSConfig) -> None:
        super().__init__()
        self.backbone = ResNetStem(c)
        self.proj = nn.Conv2d(c.stage_widths[-1], c.width, 1)


# --- the ViT -------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, c: MiDaSConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c.width, eps=1e-6)
        self.attn = Attention(c.width, c.heads)
        self.norm2 = nn.LayerNorm(c.width, eps=1e-6)
        self.mlp = Mlp(c.width, c.mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class HybridViT(nn.Module):
    """timm's ``vit_base_resnet50_384`` as the reference uses it (``pretrained.model``)."""

    def __init__(self, c: MiDaSConfig) -> None:
        super().__init__()
        self.config = c
        grid = c.image_size // 16
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, c.width))
        self.patch_embed = HybridEmbed(c)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.width, eps=1e-6)  # stored; its output is not used by the estimator
        if c.num_classes:
            self.head = nn.Linear(c.width, c.num_classes)  # ImageNet head: stored, unused

    def _pos_embed(self, rows: int, cols: int) -> torch.Tensor:
        cls, grid = self.pos_embed[:, :1], self.pos_embed[0, 1:]
        side = math.isqrt(grid.shape[0])
        grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, cols), mode="bilinear", align_corners=False)
        return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[stage 1 map, stage 2 map, tokens after hooks[0], tokens after hooks[1]] (tokens with readout)."""
        stages = self.patch_embed.backbone(x)
        tokens = self.patch_embed.proj(stages[-1])
        rows, cols = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(tokens), tokens], dim=1)
        tokens = tokens + self._pos_embed(rows, cols).to(tokens)
        hooked = []
        for i, block in enumerate(self.blocks[: self.config.hooks[1] + 1]):
            tokens = block(tokens)
            if i in self.config.hooks:
                hooked.append(tokens)
        return [stages[0], stages[1], *hooked]


# --- reassembling tokens into maps, fusion, head -------------------------------------------------


class ProjectReadout(nn.Module):
    """Each patch token concatenated with the readout (class) token, projected back to the width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * width, width), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x[:, 1:]
        return self.project(torch.cat([patches, x[:, :1].expand_as(patches)], dim=-1))


class Reassemble(nn.Sequential):
    """``act_postprocess3/4``: readout (0), [to a map: 1, 2, no weights], 1x1 conv (3), [3x3 stride 2 (4)]."""

    def __init__(self, width: int, out: int, downsample: bool) -> None:
        layers: list[nn.Module] = [
            ProjectReadout(width),
            nn.Identity(),
            nn.Identity(),
            nn.Conv2d(width, out, 1),
        ]
        if downsample:
            layers.append(nn.Conv2d(out, out, 3, stride=2, padding=1))
        super().__init__(*layers)

    def forward(self, tokens: torch.Tensor, rows: int = 0, cols: int = 0) -> torch.Tensor:  # type: ignore[override]
        x = self[0](tokens).transpose(1, 2)
        x = x.reshape(x.shape[0], x.shape[1], rows, cols)
        for layer in list(self)[3:]:
            x = layer(x)
        return x


class Pretrained(nn.Module):
    """``pretrained``: the hybrid ViT and the reassembly of its two token features."""

    def __init__(self, c: MiDaSConfig) -> None:
        super().__init__()
        self.model = HybridViT(c)
        self.act_postprocess3 = Reassemble(c.width, c.reassembled[2], downsample=False)
        self.act_postprocess4 = Reassemble(c.width, c.reassembled[3], downsample=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        layer1, layer2, tokens3, tokens4 = self.model(x)
        rows, cols = x.shape[-2] // 16, x.shape[-1] // 16
        return [
            layer1,
            layer2,
            self.act_postprocess3(tokens3, rows, cols),
            self.act_postprocess4(tokens4, rows, cols),
        ]


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """``refinenetN``: add the (refined) skip feature, refine, upsample 2x, project."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Upsample2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class Scratch(nn.Module):
    def __init__(self, c: MiDaSConfig) -> None:
        super().__init__()
        f = c.features
        for i, cin in enumerate(c.reassembled, start=1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(cin, f, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self, f"refinenet{i}", FeatureFusionBlock(f))
        self.output_conv = nn.Sequential(
            nn.Conv2d(f, f // 2, 3, padding=1),
            Upsample2x(),
            nn.Conv2d(f // 2, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, 1),
            nn.ReLU(),  # non-negative depth
            nn.Identity(),
        )

    def forward(self, layers: list[torch.Tensor]) -> torch.Tensor:
        rn = [getattr(self, f"layer{i}_rn")(x) for i, x in enumerate(layers, start=1)]
        path = self.refinenet4(rn[3])
        path = self.refinenet3(path, rn[2])
        path = self.refinenet2(path, rn[1])
        path = self.refinenet1(path, rn[0])
        return self.output_conv(path)[:, 0]


class DPTDepthModel(nn.Module):
    def __init__(self, c: MiDaSConfig) -> None:
        super().__init__()
        self.pretrained = Pretrained(c)
        self.scratch = Scratch(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scratch(self.pretrained(x))


class MiDaSDepthEstimator(nn.Module):
    """``estimator(x) -> depth``: x [B, 3, H, W] in [-1, 1] (the reference's MiDaS input: [0, 1]
    normalised with mean 0.5 and std 0.5), H and W multiples of 32; depth [B, H, W], larger is nearer."""

    def __init__(self, config: MiDaSConfig | None = None) -> None:
        super().__init__()
        self.config = config or MiDaSConfig()
        self.model = DPTDepthModel(self.config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(
                f"the depth estimator takes [B, 3, H, W] with H, W multiples of 32, got {list(x.shape)}"
            )
        return self.model(x)


# --- from a checkpoint -----------------------------------------------------------------------------


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := regex.match(k))})


def infer_midas_config(sd: Mapping[str, torch.Tensor]) -> MiDaSConfig:
    """The estimator's sizes from its weights (keys without ``depth_model.``); heads are 64 wide."""
    vit = _BACKBONE
    width = sd[vit + "cls_token"].shape[-1]
    layers = _count(sd, re.escape(vit) + r"blocks\.(\d+)\.")
    stages = [
        _count(sd, re.escape(vit) + rf"patch_embed\.backbone\.stages\.{i}\.blocks\.(\d+)\.") for i in range(3)
    ]
    stage = vit + "patch_embed.backbone.stages.{}.blocks.0.conv3.weight"
    return MiDaSConfig(
        image_size=16 * math.isqrt(sd[vit + "pos_embed"].shape[1] - 1),
        width=width,
        layers=layers,
        heads=max(1, width // 64),
        mlp_width=sd[vit + "blocks.0.mlp.fc1.weight"].shape[0],
        hooks=(8, 11) if layers == 12 else (2 * layers // 3, layers - 1),
        stem_width=sd[vit + "patch_embed.backbone.stem.conv.weight"].shape[0],
        stage_depths=tuple(stages),
        stage_widths=tuple(sd[stage.format(i)].shape[0] for i in range(3)),
        features=sd["model.scratch.layer1_rn.weight"].shape[0],
        num_classes=sd[vit + "head.weight"].shape[0] if vit + "head.weight" in sd else 0,
    )
