"""Write a text-to-image model's networks as a checkpoint others read: the original single file, or a
diffusers folder. Both whole or not at all (a temporary name, renamed when complete).

The single file holds the UNet, VAE and text encoder under the reference's prefixes (SD 1's text
encoder in transformers' names, SD 2's in OpenCLIP's) and, in its metadata, what the weights do not
say (prediction type, latent scale, image size, text heads), which openldm reads back. SD 2 files carry
one OpenCLIP block more than SD 2 runs (it takes the penultimate layer's output): when the caller has
no such block, a copy of the last block that runs stands in for it; nothing computes with it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from openldm.checkpoints.detect import TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX
from openldm.checkpoints.formats.clip import text_config_to_transformers, text_to_open_clip
from openldm.checkpoints.formats.unet import unet_config_to_diffusers, unet_to_diffusers
from openldm.checkpoints.formats.vae import vae_config_to_diffusers, vae_to_diffusers
from openldm.checkpoints.variant_files import spec_metadata
from openldm.config import ModelSpec
from openldm.files import new_file_beside, replaced_when_done
from openldm.tokenizer import CLIPTokenizer

StateDict = dict[str, torch.Tensor]
FULL_MODELS = ("sd1", "sd2")


def _cpu(sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> StateDict:
    return {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in sd.items()}


def _check_variant(spec: ModelSpec) -> None:
    if spec.variant not in FULL_MODELS:
        raise ValueError(f"only text-to-image models are written here; this is a {spec.variant} model")


def single_file_state_dict(
    spec: ModelSpec, unet: nn.Module, vae: nn.Module, text: nn.Module, dtype: torch.dtype | None = None
) -> StateDict:
    """The networks' weights under the reference single file's names (``dtype``: cast, else as they are)."""
    _check_variant(spec)
    sd = {UNET_PREFIX + k: v for k, v in _cpu(unet.state_dict(), dtype).items()}
    sd.update({VAE_PREFIX + k: v for k, v in _cpu(vae.state_dict(), dtype).items()})
    ours = _cpu(text.state_dict(), dtype)
    if spec.text.activation == "quick_gelu":  # SD 1: CLIP ViT-L in transformers' names
        sd.update({TEXT_PREFIXES["transformers"] + k: v for k, v in ours.items()})
    else:  # SD 2: OpenCLIP, one block more than runs
        last = spec.text.layers - 1
        layer = f"text_model.encoder.layers.{last}."
        extra = {k[len(layer) :]: v.clone() for k, v in ours.items() if k.startswith(layer)}
        open_clip = text_to_open_clip(ours, extra_layers=[extra])
        sd.update({TEXT_PREFIXES["open_clip"] + k: v for k, v in open_clip.items()})
    return sd


def write_single_file(
    path: str | os.PathLike[str],
    spec: ModelSpec,
    unet: nn.Module,
    vae: nn.Module,
    text: nn.Module,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write the model as one ``.safetensors`` file in the reference's layout."""
    from safetensors.torch import save_file

    sd = single_file_state_dict(spec, unet, vae, text, dtype)
    with replaced_when_done(path) as temporary:
        save_file(sd, str(temporary), metadata={**spec_metadata(spec), **(metadata or {})})
    return Path(path)


def _json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _scheduler(spec: ModelSpec) -> dict[str, object]:
    return {
        "_class_name": "DDIMScheduler",
        "beta_start": spec.schedule.beta_start,
        "beta_end": spec.schedule.beta_end,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": spec.schedule.num_timesteps,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "v_prediction" if spec.prediction_type == "v" else "epsilon",
    }


def _tokenizer(folder: Path, tokenizer: CLIPTokenizer, pad_token_id: int) -> None:
    vocab = tokenizer.vocab
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab.encoder, ensure_ascii=False), encoding="utf-8")
    merges = sorted(vocab.ranks, key=vocab.ranks.__getitem__)
    lines = ["#version: 0.2", *(" ".join(pair) for pair in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokens = {i: t for t, i in vocab.encoder.items()}
    _json(
        folder / "special_tokens_map.json",
        {
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "pad_token": tokens.get(pad_token_id, "<|endoftext|>"),
        },
    )
    _json(folder / "tokenizer_config.json", {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77})


def write_diffusers_folder(
    folder: str | os.PathLike[str],
    spec: ModelSpec,
    unet: nn.Module,
    vae: nn.Module,
    text: nn.Module,
    tokenizer: CLIPTokenizer,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the model as a diffusers ``StableDiffusionPipeline`` folder (model_index.json, unet, vae,
    text_encoder, tokenizer, scheduler); the folder appears when it is complete."""
    from safetensors.torch import save_file

    _check_variant(spec)
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} exists; choose a new folder for the diffusers model")
    handle, temporary = new_file_beside(folder)
    os.close(handle)
    temporary.unlink()
    try:
        _json(
            temporary / "model_index.json",
            {
                "_class_name": "StableDiffusionPipeline",
                "feature_extractor": [None, None],
                "safety_checker": [None, None],
                "requires_safety_checker": False,
                "scheduler": ["diffusers", "DDIMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            },
        )
        parts = {
            "unet": (unet_to_diffusers(_cpu(unet.state_dict(), dtype), spec.unet), "diffusion_pytorch_model"),
            "vae": (vae_to_diffusers(_cpu(vae.state_dict(), dtype), spec.vae), "diffusion_pytorch_model"),
            "text_encoder": (_cpu(text.state_dict(), dtype), "model"),
        }
        configs = {
            "unet": {
                "_class_name": "UNet2DConditionModel",
                **unet_config_to_diffusers(spec.unet),
                "sample_size": spec.image_size // 2 ** (len(spec.vae.ch_mult) - 1),
            },
            "vae": {
                "_class_name": "AutoencoderKL",
                **vae_config_to_diffusers(spec.vae),
                "sample_size": spec.image_size,
            },
            "text_encoder": text_config_to_transformers(spec.text),
        }
        for name, (sd, stem) in parts.items():
            (temporary / name).mkdir(parents=True)
            save_file(sd, str(temporary / name / f"{stem}.safetensors"))
            _json(temporary / name / "config.json", configs[name])
        _tokenizer(temporary / "tokenizer", tokenizer, spec.text.pad_token_id)
        _json(temporary / "scheduler" / "scheduler_config.json", _scheduler(spec))
        os.replace(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return folder
