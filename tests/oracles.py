"""Independent oracles (diffusers / transformers, test-only) and writers of the on-disk formats.

The oracles are built from our configs through the ``formats`` config translators and get seeded
random weights. The writers put the same weights on disk the way users have them: a diffusers
folder (as published, transformers 4.x text encoder layout) and an original single file
(``.safetensors`` / ``.ckpt``) with the reference's prefixes and the extra tensors real files carry.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import yaml

from openldm.checkpoints.formats.clip import (
    text_config_to_transformers,
    text_from_transformers,
    text_to_open_clip,
)
from openldm.checkpoints.formats.clip_vision import vision_config_to_transformers
from openldm.checkpoints.formats.unet import unet_config_to_diffusers, unet_from_diffusers
from openldm.checkpoints.formats.vae import vae_config_to_diffusers, vae_from_diffusers
from openldm.config import ModelSpec, TextConfig, UNetConfig, VAEConfig
from openldm.nn.clip_vision import VisionConfig
from openldm.nn.midas import MiDaSConfig
from openldm.tokenizer import packaged_vocab

StateDict = dict[str, torch.Tensor]

# model_index.json "_class_name" and the other components of each published pipeline.
_SAFETY = {
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "requires_safety_checker": True,
}
_NO_SAFETY = {
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": [None, None],
    "requires_safety_checker": False,
}
PIPELINES: dict[str, tuple[str, dict[str, Any]]] = {
    "sd1": ("StableDiffusionPipeline", _SAFETY),
    "sd2": ("StableDiffusionPipeline", _NO_SAFETY),
    "sd2-v": ("StableDiffusionPipeline", _NO_SAFETY),
    "inpaint": ("StableDiffusionInpaintPipeline", _NO_SAFETY),
    "sd1-inpaint": ("StableDiffusionInpaintPipeline", _SAFETY),
    "depth": (
        "StableDiffusionDepth2ImgPipeline",
        {
            "depth_estimator": ["transformers", "DPTForDepthEstimation"],
            "feature_extractor": ["transformers", "DPTFeatureExtractor"],
        },
    ),
    "x4-upscaler": (
        "StableDiffusionUpscalePipeline",
        {
            "low_res_scheduler": ["diffusers", "DDPMScheduler"],
            "max_noise_level": 350,
            "feature_extractor": [None, None],
            "safety_checker": [None, None],
            "watermarker": [None, None],
        },
    ),
    "unclip": (
        "StableUnCLIPImg2ImgPipeline",
        {
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
            "image_noising_scheduler": ["diffusers", "DDPMScheduler"],
            "image_normalizer": ["stable_diffusion", "StableUnCLIPImageNormalizer"],
        },
    ),
}
# The published stabilityai/stable-diffusion-x4-upscaler low_res_scheduler config (the reference's
# low_scale_config: betas 1e-4..0.02 linear in sqrt space).
LOW_RES_SCHEDULER: dict[str, Any] = {
    "_class_name": "DDPMScheduler",
    "beta_end": 0.02,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_small",
}
# Components with weights in a diffusers folder that the loader returns untouched in ``extras``
# (folder -> weights file -> tensor shapes); the safety checker is written too and must be skipped.
DIFFUSERS_EXTRAS: dict[str, dict[str, tuple[str, dict[str, tuple[int, ...]]]]] = {
    "depth": {"depth_estimator": ("model.safetensors", {"dpt.embeddings.cls_token": (1, 1, 32)})},
    "unclip": {
        "image_encoder": ("model.safetensors", {"vision_model.embeddings.class_embedding": (32,)}),
        "image_normalizer": ("diffusion_pytorch_model.safetensors", {"mean": (1, 64), "std": (1, 64)}),
    },
}
# Extra components of single files (prefix -> tensor shapes), returned in ``extras`` without prefix.
SINGLE_FILE_EXTRAS: dict[str, dict[str, tuple[int, ...]]] = {
    "depth": {"depth_model.model.scratch.output_conv.0.weight": (8, 16, 3, 3)},
    "x4-upscaler": {"low_scale_model.betas": (350,), "low_scale_model.alphas_cumprod": (350,)},
    "unclip": {
        "embedder.model.visual.proj": (32, 64),
        "noise_augmentor.data_mean": (1, 64),
        "noise_augmentor.data_std": (1, 64),
    },
}


def is_sd1(spec: ModelSpec) -> bool:
    """CLIP ViT-L text encoder (SD 1 layout) rather than OpenCLIP (SD 2 layout)."""
    return spec.text.activation == "quick_gelu"


def pad_token(spec: ModelSpec) -> str:
    return "<|endoftext|>" if is_sd1(spec) else "!"


def seed_of(config: object) -> int:
    """A stable seed per config (equal configs share an oracle)."""
    return zlib.crc32(repr(config).encode())


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (zero-initialised output convs included), scaled to keep activations O(1).

    Norm scales are 1 + noise, biases and embeddings small noise, other weights noise / sqrt(fan-in).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            if param.ndim == 1 and "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif param.ndim == 1:
                param.copy_(0.1 * noise)
            elif "embedding" in name:
                param.copy_(0.5 * noise)
            else:
                param.copy_(noise * (param[0].numel() ** -0.5))
    return module.eval().requires_grad_(False)


def unet_oracle(config: UNetConfig) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return randomize_(UNet2DConditionModel.from_config(unet_config_to_diffusers(config)), seed_of(config))


def vae_oracle(config: VAEConfig) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return randomize_(AutoencoderKL.from_config(vae_config_to_diffusers(config)), seed_of(config))


def text_oracle(config: TextConfig) -> torch.nn.Module:
    import transformers

    hf_config = transformers.CLIPTextConfig(
        **text_config_to_transformers(config), attn_implementation="eager"
    )
    torch.manual_seed(0)
    return randomize_(transformers.CLIPTextModel(hf_config), seed_of(config))


def vision_oracle(config: VisionConfig, seed: int = 11) -> torch.nn.Module:
    """transformers' ``CLIPVisionModelWithProjection`` with ``config``'s sizes and random weights."""
    import transformers

    hf_config = transformers.CLIPVisionConfig(
        **vision_config_to_transformers(config), attn_implementation="eager"
    )
    torch.manual_seed(0)
    return randomize_(transformers.CLIPVisionModelWithProjection(hf_config), seed)


def dpt_hybrid_config(c: MiDaSConfig, image_size: int) -> Any:
    """transformers' DPT-hybrid config with ``c``'s sizes (timm's LayerNorm eps and exact GELU)."""
    import transformers

    return transformers.DPTConfig(
        is_hybrid=True,
        hidden_size=c.width,
        num_hidden_layers=c.layers,
        num_attention_heads=c.heads,
        intermediate_size=c.mlp_width,
        image_size=image_size,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        backbone_out_indices=[0, 1, *c.hooks],
        neck_hidden_sizes=list(c.reassembled),
        fusion_hidden_size=c.features,
        reassemble_factors=[1, 1, 1, 0.5],
        backbone_featmap_shape=[1, c.stage_widths[-1], image_size // 16, image_size // 16],
        backbone_config={
            "global_padding": "same",
            "layer_type": "bottleneck",
            "depths": list(c.stage_depths),
            "out_features": ["stage1", "stage2", "stage3"],
            "embedding_dynamic_padding": True,
            "hidden_sizes": list(c.stage_widths),
            "embedding_size": c.stem_width,
            "num_groups": c.num_groups,
        },
    )


@dataclass(frozen=True)
class Oracles:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text: torch.nn.Module


# --- diffusers folders ---------------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _save(tensors: StateDict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path)


def write_tokenizer(folder: Path, pad: str) -> None:
    """vocab.json, merges.txt (from the packaged vocabulary) and special_tokens_map.json naming ``pad``."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = packaged_vocab()
    merges = sorted(vocab.ranks, key=vocab.ranks.__getitem__)
    (folder / "vocab.json").write_text(json.dumps(vocab.encoder, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )

    def special(content: str) -> dict[str, Any]:
        return {
            "content": content,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        }

    _write_json(
        folder / "special_tokens_map.json",
        {
            "bos_token": special("<|startoftext|>"),
            "eos_token": special("<|endoftext|>"),
            "pad_token": pad,
            "unk_token": special("<|endoftext|>"),
        },
    )


def _scheduler_config(spec: ModelSpec) -> dict[str, Any]:
    return {
        "_class_name": "DDIMScheduler" if spec.variant != "sd1" else "PNDMScheduler",
        "_diffusers_version": "0.8.0",
        "beta_start": spec.schedule.beta_start,
        "beta_end": spec.schedule.beta_end,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": spec.schedule.num_timesteps,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "prediction_type": "v_prediction" if spec.prediction_type == "v" else "epsilon",
    }


def write_text_encoder_4x(folder: Path, spec: ModelSpec, oracle: torch.nn.Module) -> None:
    """The published transformers 4.x layout: ``text_model.`` keys (+ SD 1's position_ids) and config."""
    sd = {f"text_model.{k}": v for k, v in oracle.state_dict().items()}
    assert not any(k.startswith("text_model.text_model.") for k in sd)
    if is_sd1(spec):
        sd["text_model.embeddings.position_ids"] = torch.arange(spec.text.max_length)[None]
    _save(sd, folder / "model.safetensors")
    config = {
        **text_config_to_transformers(spec.text),
        "_name_or_path": "openai/clip-vit-large-patch14",
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "pad_token_id": 1,  # as published: the tokenizer, not this file, decides the padding
        "torch_dtype": "float32",
        "transformers_version": "4.25.0.dev0",
    }
    _write_json(folder / "config.json", config)


def _save_quietly(model: Any, folder: Path) -> None:
    """transformers' ``save_pretrained`` without its progress bar (it clutters ``pytest -s``)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def write_diffusers_folder(
    folder: Path, variant: str, spec: ModelSpec, oracles: Oracles, text_5x: bool
) -> None:
    """A diffusers folder as published; ``text_5x``: the text encoder as transformers 5.x saves it."""
    pipeline, components = PIPELINES[variant]
    index: dict[str, Any] = {
        "_class_name": pipeline,
        "_diffusers_version": "0.8.0",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        **components,
    }
    _write_json(folder / "model_index.json", index)
    oracles.unet.save_pretrained(folder / "unet")
    oracles.vae.save_pretrained(folder / "vae")
    if text_5x:
        _save_quietly(oracles.text, folder / "text_encoder")
    else:
        write_text_encoder_4x(folder / "text_encoder", spec, oracles.text)
    write_tokenizer(folder / "tokenizer", pad_token(spec))
    _write_json(folder / "scheduler" / "scheduler_config.json", _scheduler_config(spec))
    if components.get("safety_checker", [None])[0] is not None:  # never needed: must not be read
        _write_json(folder / "safety_checker" / "config.json", {"model_type": "clip"})
        _save(
            {"vision_model.post_layernorm.weight": torch.ones(8)},
            folder / "safety_checker" / "model.safetensors",
        )
    if "low_res_scheduler" in components:
        _write_json(folder / "low_res_scheduler" / "scheduler_config.json", LOW_RES_SCHEDULER)
    if "image_noising_scheduler" in components:
        _write_json(
            folder / "image_noising_scheduler" / "scheduler_config.json", {"_class_name": "DDPMScheduler"}
        )
    for name, (filename, tensors) in diffusers_extras(variant).items():
        _save(tensors, folder / name / filename)


def write_unclip_extras(
    folder: Path, encoder: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor, image_size: int
) -> None:
    """A real image encoder, normalizer, noising scheduler and feature extractor (over the placeholders)."""
    import diffusers
    import transformers
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )

    _save_quietly(encoder, folder / "image_encoder")
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=mean.shape[-1])
    with torch.no_grad():
        normalizer.mean.copy_(mean)
        normalizer.std.copy_(std)
    normalizer.save_pretrained(folder / "image_normalizer")
    diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(
        folder / "image_noising_scheduler"
    )
    transformers.CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(folder / "feature_extractor")


def diffusers_extras(variant: str) -> dict[str, tuple[str, StateDict]]:
    """Weights of the extra components of a variant's diffusers folder (seeded)."""
    gen = torch.Generator().manual_seed(7)
    return {
        name: (filename, {k: torch.randn(shape, generator=gen) for k, shape in shapes.items()})
        for name, (filename, shapes) in DIFFUSERS_EXTRAS.get(variant, {}).items()
    }


# --- original single files -----------------------------------------------------------------------


def single_file_extras(variant: str) -> StateDict:
    gen = torch.Generator().manual_seed(8)
    return {k: torch.randn(shape, generator=gen) for k, shape in SINGLE_FILE_EXTRAS.get(variant, {}).items()}


def single_file_state_dict(variant: str, spec: ModelSpec, oracles: Oracles) -> StateDict:
    """The oracles' weights in the reference layout, made with our converters, under the real prefixes."""
    sd = {
        f"model.diffusion_model.{k}": v
        for k, v in unet_from_diffusers(oracles.unet.state_dict(), spec.unet).items()
    }
    sd |= {
        f"first_stage_model.{k}": v for k, v in vae_from_diffusers(oracles.vae.state_dict(), spec.vae).items()
    }
    text = text_from_transformers(oracles.text.state_dict())
    if is_sd1(spec):
        sd |= {f"cond_stage_model.transformer.{k}": v for k, v in text.items()}
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(
            spec.text.max_length
        )[None]
    else:  # OpenCLIP: one more resblock than SD 2 runs, a text projection and a logit scale
        gen = torch.Generator().manual_seed(9)
        layer0 = "text_model.encoder.layers.0."
        extra = {
            k[len(layer0) :]: torch.randn(v.shape, generator=gen)
            for k, v in text.items()
            if k.startswith(layer0)
        }
        width = spec.text.width
        projection = torch.randn(width, width, generator=gen)
        open_clip = text_to_open_clip(text, [extra], projection, torch.tensor(4.6052))
        sd |= {f"cond_stage_model.model.{k}": v for k, v in open_clip.items()}
    sd |= single_file_extras(variant)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def write_single_file(path: Path, sd: StateDict) -> None:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(sd, path)
    else:
        torch.save({"state_dict": sd, "global_step": 1}, path)


def reference_yaml(spec: ModelSpec) -> dict[str, Any]:
    """A config in the style of the reference's ``configs/stable-diffusion/*.yaml`` for ``spec``."""
    u, v = spec.unet, spec.vae
    unet_params: dict[str, Any] = {
        "use_checkpoint": True,
        "use_fp16": True,
        "image_size": 32,  # unused by the reference
        "in_channels": u.in_channels,
        "out_channels": u.out_channels,
        "model_channels": u.model_channels,
        "attention_resolutions": sorted(u.attention_resolutions, reverse=True),
        "num_res_blocks": u.num_res_blocks,
        "channel_mult": list(u.channel_mult),
        "use_spatial_transformer": True,
        "use_linear_in_transformer": u.use_linear_in_transformer,
        "transformer_depth": u.transformer_depth,
        "context_dim": u.context_dim,
        "legacy": False,
    }
    # The reference yamls name only the one that is set (SD 1: num_heads, SD 2: num_head_channels).
    if u.num_heads is not None:
        unet_params["num_heads"] = u.num_heads
    else:
        unet_params["num_head_channels"] = u.num_head_channels
    if u.disable_self_attentions is not None:
        unet_params["disable_self_attentions"] = list(u.disable_self_attentions)
        unet_params["disable_middle_self_attn"] = False
    if u.num_classes is not None:
        unet_params["num_classes"] = u.num_classes
    if u.adm_in_channels is not None:
        unet_params["adm_in_channels"] = u.adm_in_channels
    params: dict[str, Any] = {
        "linear_start": spec.schedule.beta_start,
        "linear_end": spec.schedule.beta_end,
        "num_timesteps_cond": 1,
        "log_every_t": 200,
        "timesteps": spec.schedule.num_timesteps,
        "first_stage_key": "jpg",
        "cond_stage_key": "txt",
        "image_size": spec.image_size // v.downsampling_factor,
        "channels": 4,
        "cond_stage_trainable": False,
        "conditioning_key": "hybrid" if spec.variant in ("inpaint", "depth") else "crossattn",
        "scale_factor": v.scale_factor,
        "use_ema": False,
        "unet_config": {
            "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": unet_params,
        },
        "first_stage_config": {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {
                "embed_dim": v.embed_dim,
                "monitor": "val/rec_loss",
                "ddconfig": {
                    "double_z": True,
                    "z_channels": v.z_channels,
                    "resolution": 256,
                    "in_channels": v.in_channels,
                    "out_ch": v.out_ch,
                    "ch": v.ch,
                    "ch_mult": list(v.ch_mult),
                    "num_res_blocks": v.num_res_blocks,
                    "attn_resolutions": [],
                    "dropout": 0.0,
                },
                "lossconfig": {"target": "torch.nn.Identity"},
            },
        },
        "cond_stage_config": (
            {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
            if is_sd1(spec)
            else {
                "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"freeze": True, "layer": "penultimate"},
            }
        ),
    }
    if spec.prediction_type == "v":
        params = {"parameterization": "v", **params}
    return {
        "model": {
            "base_learning_rate": 1.0e-4,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": params,
        }
    }


def write_reference_yaml(path: Path, spec: ModelSpec) -> None:
    path.write_text(yaml.safe_dump(reference_yaml(spec), sort_keys=False), encoding="utf-8")


@dataclass
class Pair:
    """Our model and diffusers' pipelines, loaded from one diffusers folder of seeded random weights."""

    model: Any  # openldm.model.StableDiffusion
    txt2img: Any  # diffusers StableDiffusionPipeline
    img2img: Any  # diffusers StableDiffusionImg2ImgPipeline
    folder: Path


def _folder_and_parts(root: Path, variant: str, size: int) -> tuple[Path, Any, Any]:
    """A diffusers folder of seeded random weights for ``variant``, with diffusers' tokenizer and UNet
    loaded from it (the folder's UNet config has no sample_size, which diffusers' pipelines insist on)."""
    import diffusers
    import transformers

    from tests.tiny import TINY

    spec = TINY[variant]
    folder = root / variant
    # Seeded random weights everywhere (the zero-initialised output convs included).
    oracles = Oracles(unet_oracle(spec.unet), vae_oracle(spec.vae), text_oracle(spec.text))
    write_diffusers_folder(folder, variant, spec, oracles, text_5x=False)
    tokenizer = transformers.CLIPTokenizer(
        str(folder / "tokenizer" / "vocab.json"),
        str(folder / "tokenizer" / "merges.txt"),
        pad_token=pad_token(spec),
        model_max_length=77,
    )
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", sample_size=size // 8)
    return folder, tokenizer, unet


NO_SAFETY = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def diffusers_pair(root: Path, variant: str, size: int) -> Pair:
    import diffusers

    import openldm

    folder, tokenizer, unet = _folder_and_parts(root, variant, size)
    txt = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, unet=unet, tokenizer=tokenizer, **NO_SAFETY
    )
    img = diffusers.StableDiffusionImg2ImgPipeline(**txt.components)
    for pipe in (txt, img):
        pipe.set_progress_bar_config(disable=True)
    return Pair(openldm.load(folder), txt, img, folder)


@dataclass
class InpaintPair:
    """Our model and diffusers' StableDiffusionInpaintPipeline, from one diffusers folder."""

    model: Any
    pipe: Any
    folder: Path


def inpaint_pair(root: Path, variant: str, size: int) -> InpaintPair:
    import diffusers

    import openldm

    folder, tokenizer, unet = _folder_and_parts(root, variant, size)
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
        folder, unet=unet, tokenizer=tokenizer, **NO_SAFETY
    )
    pipe.set_progress_bar_config(disable=True)
    return InpaintPair(openldm.load(folder), pipe, folder)
