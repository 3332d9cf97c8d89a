"""The CLIP image tower (a ViT) that embeds unCLIP's input image, and CLIP's image preprocessing.

One implementation serves OpenCLIP ViT-H/14 (GELU; the ``-h`` unCLIP model) and OpenAI CLIP
ViT-L/14 (quick-GELU; the ``-l`` model). Attribute names follow the original ``visual`` module of
both (``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``,
``transformer.resblocks.N.{ln_1,attn,ln_2,mlp.c_fc,mlp.c_proj}``, ``ln_post``, ``proj``), so an
original state dict loads without renaming; transformers' layout is mapped in
:mod:`openldm.checkpoints.formats.clip_vision`.

The image embedding is ``ln_post(class token) @ proj``, not normalised to unit length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from openldm.nn.clip import quick_gelu
from openldm.nn.upcast import compute_dtype

# CLIP's pixel statistics (OpenAI's, used by OpenCLIP ViT-H/14 too).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    """A CLIP vision transformer: ViT-H/14 (OpenCLIP) by default."""

    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp_width: int = 5120
    patch_size: int = 14
    image_size: int = 224
    # Width of the projected image embedding (unCLIP's UNet reads twice this: embedding + noise level).
    embed_dim: int = 1024
    activation: Literal["quick_gelu", "gelu"] = "gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}"
            )
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"unknown activation {self.activation!r}")
        if min(self.layers, self.mlp_width, self.embed_dim) < 1:
            raise ValueError("layers, mlp_width and embed_dim must be >= 1")

    @property
    def tokens(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


OPENCLIP_VIT_H14 = VisionConfig()
CLIP_VIT_L14 = VisionConfig(
    width=1024, layers=24, heads=16, mlp_width=4096, embed_dim=768, activation="quick_gelu"
)


class VisionAttention(nn.Module):
    """Bidirectional self-attention with a fused q/k/v projection (``nn.MultiheadAttention``'s names)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, width = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, width))


class VisionMLP(nn.Module):
    def __init__(self, width: int, mlp_width: int, activation: str) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, mlp_width)
        self.c_proj = nn.Linear(mlp_width, width)
        self.activation = quick_gelu if activation == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.activation(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = VisionAttention(config.width, config.heads)
        self.ln_2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config.width, config.mlp_width, config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class CLIPVisionEncoder(nn.Module):
    """``forward(pixels [B, 3, S, S], CLIP-normalised) -> image embeddings [B, embed_dim]``."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        w, p = config.width, config.patch_size
        self.conv1 = nn.Conv2d(3, w, kernel_size=p, stride=p, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(w))
        self.positional_embedding = nn.Parameter(torch.empty(config.tokens, w))
        self.ln_pre = nn.LayerNorm(w, eps=config.layer_norm_eps)
        self.transformer = VisionTransformer(config)
        self.ln_post = nn.LayerNorm(w, eps=config.layer_norm_eps)
        self.proj = nn.Parameter(torch.empty(w, config.embed_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"pixels must be [B, 3, {size}, {size}], got {list(pixels.shape)}")
        x = self.conv1(pixels.to(compute_dtype(self))).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


# --- preprocessing -----------------------------------------------------------------------------


def preprocess(images: Image.Image | list[Image.Image], size: int = 224) -> torch.Tensor:
    """CLIP's preprocessing of PIL images: float32 [B, 3, size, size], normalised with CLIP's statistics.

    The shortest side is resized to ``size`` (PIL bicubic; the longest side to
    ``int(size * long / short)``), the centre ``size`` x ``size`` crop is kept (offsets rounded down),
    pixels go to [0, 1] and are normalised. This is what diffusers' unCLIP pipeline does (transformers'
    ``CLIPImageProcessor``). The reference's own embedders instead squash the [-1, 1] image to
    224 x 224 with an antialiased bicubic resize (kornia), without cropping.
    """
    batch = [images] if isinstance(images, Image.Image) else list(images)
    if not batch or not all(isinstance(im, Image.Image) for im in batch):
        raise ValueError("preprocess needs a PIL image or a non-empty list of PIL images")
    return torch.from_numpy(np.stack([_preprocess_one(im, size) for im in batch]))


def _preprocess_one(image: Image.Image, size: int) -> np.ndarray:
    image = image.convert("RGB")
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    new_size = (size, new_long) if w <= h else (new_long, size)
    if new_size != image.size:
        image = image.resize(new_size, resample=Image.Resampling.BICUBIC)
    w, h = image.size
    top, left = (h - size) // 2, (w - size) // 2
    pixels = np.asarray(image)[top : top + size, left : left + size]
    # Scaled in float64, then float32 arithmetic for the normalisation, as CLIPImageProcessor does.
    unit = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean, std = np.array(CLIP_MEAN, dtype=np.float32), np.array(CLIP_STD, dtype=np.float32)
    return ((unit - mean) / std).transpose(2, 0, 1)
