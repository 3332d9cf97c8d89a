"""Tiny configurations of every variant, shared by the tests.

They keep the structure of the real presets (levels with and without attention, the SD 1 rule of
8 heads, the SD 2 rule of 64-wide heads, 64-wide text heads) at a size that runs in milliseconds.
"""

from __future__ import annotations

import dataclasses

from openldm.config import ModelSpec, ScheduleConfig, TextConfig, UNetConfig, VAEConfig

TINY_CLIP_L = TextConfig(width=128, layers=2, heads=2, mlp_width=256)
TINY_OPENCLIP_H = TextConfig(width=128, layers=2, heads=2, mlp_width=256, activation="gelu", pad_token_id=0)

TINY_SD1_UNET = UNetConfig(
    model_channels=32,
    channel_mult=(1, 2, 2),
    attention_resolutions=(1, 2),
    num_heads=8,
    context_dim=128,
)
TINY_SD2_UNET = UNetConfig(
    model_channels=64,
    channel_mult=(1, 2, 2),
    attention_resolutions=(1, 2),
    num_heads=None,
    num_head_channels=64,
    context_dim=128,
    use_linear_in_transformer=True,
    upcast_attention=True,
)
TINY_X4_UNET = UNetConfig(
    in_channels=7,
    model_channels=32,
    channel_mult=(1, 2, 2),
    attention_resolutions=(2, 4),
    num_heads=8,
    context_dim=128,
    use_linear_in_transformer=True,
    disable_self_attentions=(True, True, False),
    num_classes=1000,
)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2))
TINY_X4_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2), scale_factor=0.08333)

TINY: dict[str, ModelSpec] = {
    "sd1": ModelSpec("tiny-sd1", "sd1", TINY_SD1_UNET, TINY_VAE, TINY_CLIP_L),
    "sd2": ModelSpec("tiny-sd2", "sd2", TINY_SD2_UNET, TINY_VAE, TINY_OPENCLIP_H),
    "sd2-v": ModelSpec("tiny-sd2-v", "sd2", TINY_SD2_UNET, TINY_VAE, TINY_OPENCLIP_H, prediction_type="v"),
    "inpaint": ModelSpec(
        "tiny-inpaint",
        "inpaint",
        dataclasses.replace(TINY_SD2_UNET, in_channels=9),
        TINY_VAE,
        TINY_OPENCLIP_H,
    ),
    "sd1-inpaint": ModelSpec(
        "tiny-sd1-inpaint",
        "inpaint",
        dataclasses.replace(TINY_SD1_UNET, in_channels=9),
        TINY_VAE,
        TINY_CLIP_L,
    ),
    "depth": ModelSpec(
        "tiny-depth", "depth", dataclasses.replace(TINY_SD2_UNET, in_channels=5), TINY_VAE, TINY_OPENCLIP_H
    ),
    "x4-upscaler": ModelSpec(
        "tiny-x4",
        "x4-upscaler",
        TINY_X4_UNET,
        TINY_X4_VAE,
        TINY_OPENCLIP_H,
        prediction_type="v",
        schedule=ScheduleConfig(beta_start=0.0001, beta_end=0.02),
    ),
    "unclip": ModelSpec(
        "tiny-unclip",
        "unclip",
        dataclasses.replace(TINY_SD2_UNET, num_classes="sequential", adm_in_channels=64),
        TINY_VAE,
        TINY_OPENCLIP_H,
        prediction_type="v",
    ),
}
