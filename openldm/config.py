"""Model sizes as frozen dataclasses, and one named preset per checkpoint kind.

Field names follow the reference implementation's yaml configs (``model_channels``,
``channel_mult``, ``attention_resolutions``, ...) so a reference config maps onto them
one to one. Variants are made with ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

PredictionType = Literal["eps", "v"]
Variant = Literal["sd1", "sd2", "inpaint", "depth", "x4-upscaler", "unclip"]
VARIANTS: tuple[str, ...] = ("sd1", "sd2", "inpaint", "depth", "x4-upscaler", "unclip")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class UNetConfig:
    """The denoising UNet (the reference's ``openaimodel.UNetModel``)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Downsampling factors (1, 2, 4, ...) at which a transformer follows each res block.
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    # Exactly one of the two: a fixed head count (SD 1) or a fixed head width (SD 2).
    num_heads: int | None = 8
    num_head_channels: int | None = None
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    # Per level: the first attention of each transformer block attends to the context too.
    disable_self_attentions: tuple[bool, ...] | None = None
    # None; an int for an embedding table (x4 upscaler's noise level); "sequential" for a
    # projected vector of ``adm_in_channels`` (unCLIP's noised image embedding).
    num_classes: int | Literal["sequential"] | None = None
    adm_in_channels: int | None = None
    # Compute attention in fp32 even when the model runs in fp16 (SD 2.x needs it).
    upcast_attention: bool = False

    def __post_init__(self) -> None:
        # The order carries no meaning (the weights cannot show it): keep one canonical order.
        object.__setattr__(self, "attention_resolutions", tuple(sorted(self.attention_resolutions)))
        _require(self.in_channels > 0 and self.out_channels > 0, "channel counts must be > 0")
        _require(self.model_channels % 32 == 0, "model_channels must be a multiple of 32")
        _require(len(self.channel_mult) > 0, "channel_mult must not be empty")
        _require(
            (self.num_heads is None) != (self.num_head_channels is None),
            "set exactly one of num_heads and num_head_channels",
        )
        if self.disable_self_attentions is not None:
            _require(
                len(self.disable_self_attentions) == len(self.channel_mult),
                "disable_self_attentions needs one entry per channel_mult level",
            )
        if self.num_classes == "sequential":
            _require(self.adm_in_channels is not None, "num_classes='sequential' needs adm_in_channels")

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, head width) of the attention at a level with ``channels`` channels."""
        if self.num_head_channels is not None:
            return channels // self.num_head_channels, self.num_head_channels
        assert self.num_heads is not None
        return self.num_heads, channels // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    """The KL autoencoder (the reference's ``AutoencoderKL`` with its ``ddconfig``)."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    # Latents are multiplied by this after encoding and divided by it before decoding.
    scale_factor: float = 0.18215

    def __post_init__(self) -> None:
        _require(self.ch % 32 == 0, "ch must be a multiple of 32 (GroupNorm with 32 groups)")
        _require(len(self.ch_mult) > 0, "ch_mult must not be empty")
        _require(self.scale_factor > 0, "scale_factor must be > 0")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextConfig:
    """A CLIP text transformer and the tokenizer settings that go with it.

    ``layers`` counts the layers that run: SD 2 takes OpenCLIP's penultimate layer, so its
    preset has 23 of the checkpoint's 24 (the last one is never used and is not loaded).
    The final layer norm is applied to the output in both cases.
    """

    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    max_length: int = 77
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"
    # SD 1 pads with the end-of-text token (49407), SD 2 with 0.
    pad_token_id: int = 49407

    def __post_init__(self) -> None:
        _require(self.width % self.heads == 0, "width must be divisible by heads")
        _require(self.layers > 0, "layers must be > 0")
        _require(self.activation in ("quick_gelu", "gelu"), f"unknown activation {self.activation!r}")


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule: betas linear in sqrt space from start to end."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_timesteps: int = 1000


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build and run one kind of checkpoint."""

    name: str
    variant: Variant
    unet: UNetConfig
    vae: VAEConfig
    text: TextConfig
    prediction_type: PredictionType = "eps"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    image_size: int = 512

    def __post_init__(self) -> None:
        _require(self.variant in VARIANTS, f"unknown variant {self.variant!r}")
        _require(self.prediction_type in ("eps", "v"), f"unknown prediction type {self.prediction_type!r}")
        _require(
            self.unet.context_dim == self.text.width,
            f"UNet context_dim {self.unet.context_dim} != text width {self.text.width}",
        )


CLIP_L = TextConfig()
OPENCLIP_H = TextConfig(width=1024, layers=23, heads=16, mlp_width=4096, activation="gelu", pad_token_id=0)

SD1_UNET = UNetConfig()
SD2_UNET = UNetConfig(
    num_heads=None,
    num_head_channels=64,
    context_dim=1024,
    use_linear_in_transformer=True,
    upcast_attention=True,
)
X4_UNET = UNetConfig(
    in_channels=7,
    model_channels=256,
    channel_mult=(1, 2, 2, 4),
    attention_resolutions=(2, 4, 8),
    num_heads=8,
    context_dim=1024,
    use_linear_in_transformer=True,
    disable_self_attentions=(True, True, True, False),
    num_classes=1000,
)
SD_VAE = VAEConfig()
X4_VAE = VAEConfig(ch_mult=(1, 2, 4), scale_factor=0.08333)

# The embedded default model, trained by ``openldm train`` (openldm/train/embedded.py) on the shapes
# dataset: an SD 1 architecture at a size whose fp16 weights fit in 25 MB. Head counts follow the rules
# the loader infers from weights (8 UNet heads); the text encoder's 4 heads of 16 (one head of 64 lost
# held-out colour-kind pairs) are stated in the file's metadata, which the loader believes over a
# preset. The UNet has 96 channels at every level (8x8, 4x4 and 2x2 latents), where the shapes are
# drawn: on the same autoencoder and text encoder, each UNet given the steps that fit 28 minutes, seen
# kind 67.7% (3150 steps) against 58.7% for 64, 64, 128 channels (4200 steps) and 61.9% for a second
# residual block per level (3200 steps). The scale factor is the one the training measured (1 / std).
EMBEDDED_TEXT = TextConfig(width=64, layers=4, heads=4, mlp_width=256)
EMBEDDED_UNET = UNetConfig(
    model_channels=96,
    channel_mult=(1, 1, 1),
    num_res_blocks=1,
    attention_resolutions=(1, 2, 4),
    num_heads=8,
    context_dim=64,
)
EMBEDDED_VAE = VAEConfig(ch=64, ch_mult=(1, 1, 1, 1), num_res_blocks=1, scale_factor=0.78573)

PRESETS: dict[str, ModelSpec] = {
    "sd15": ModelSpec("sd15", "sd1", SD1_UNET, SD_VAE, CLIP_L),
    "sd2-base": ModelSpec("sd2-base", "sd2", SD2_UNET, SD_VAE, OPENCLIP_H),
    "sd2-v": ModelSpec("sd2-v", "sd2", SD2_UNET, SD_VAE, OPENCLIP_H, prediction_type="v", image_size=768),
    "sd2-inpaint": ModelSpec(
        "sd2-inpaint", "inpaint", dataclasses.replace(SD2_UNET, in_channels=9), SD_VAE, OPENCLIP_H
    ),
    "sd15-inpaint": ModelSpec(
        "sd15-inpaint", "inpaint", dataclasses.replace(SD1_UNET, in_channels=9), SD_VAE, CLIP_L
    ),
    "sd2-depth": ModelSpec(
        "sd2-depth", "depth", dataclasses.replace(SD2_UNET, in_channels=5), SD_VAE, OPENCLIP_H
    ),
    "x4-upscaler": ModelSpec(
        "x4-upscaler",
        "x4-upscaler",
        X4_UNET,
        X4_VAE,
        OPENCLIP_H,
        prediction_type="v",
        schedule=ScheduleConfig(beta_start=0.0001, beta_end=0.02),
    ),
    "sd21-unclip-h": ModelSpec(
        "sd21-unclip-h",
        "unclip",
        dataclasses.replace(SD2_UNET, num_classes="sequential", adm_in_channels=2048),
        SD_VAE,
        OPENCLIP_H,
        prediction_type="v",
        image_size=768,
    ),
    "sd21-unclip-l": ModelSpec(
        "sd21-unclip-l",
        "unclip",
        dataclasses.replace(SD2_UNET, num_classes="sequential", adm_in_channels=1536),
        SD_VAE,
        OPENCLIP_H,
        prediction_type="v",
        image_size=768,
    ),
    "embedded": ModelSpec("embedded", "sd1", EMBEDDED_UNET, EMBEDDED_VAE, EMBEDDED_TEXT, image_size=64),
    # The embedded model's variants (openldm/train/variants.py): its VAE and text encoder, a wider UNet input.
    "embedded-inpaint": ModelSpec(
        "embedded-inpaint",
        "inpaint",
        dataclasses.replace(EMBEDDED_UNET, in_channels=9),
        EMBEDDED_VAE,
        EMBEDDED_TEXT,
        image_size=64,
    ),
    "embedded-depth": ModelSpec(
        "embedded-depth",
        "depth",
        dataclasses.replace(EMBEDDED_UNET, in_channels=5),
        EMBEDDED_VAE,
        EMBEDDED_TEXT,
        image_size=64,
    ),
}


def preset(name: str) -> ModelSpec:
    """The named preset; a ``ValueError`` that lists the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
