"""unCLIP's image conditioning: the CLIP image embedding, noise-augmented, as the UNet's class vector ``y``.

``y = concat(unnormalise(sqrt(a_t) * normalise(e) + sqrt(1 - a_t) * noise), timestep_embedding(t))``
with ``t`` the noise level (0 to 999), ``a_t`` the ``alphas_cumprod`` of the squared-cosine schedule
(``squaredcos_cap_v2``, 1000 steps) and ``normalise(e) = (e - mean) / std`` with the embedding
statistics the checkpoint carries: the reference's ``CLIPEmbeddingNoiseAugmentation`` and diffusers'
``StableUnCLIPImg2ImgPipeline.noise_image_embeddings``. Even level 0 adds a little noise
(``sqrt(1 - a_0)`` is about 0.006).

Where the parts come from (see :attr:`openldm.model.StableDiffusion.extras`): an original single file has the
image tower under ``embedder.model.visual.*`` and the schedule (and possibly ``data_mean`` /
``data_std``) under ``noise_augmentor.*``; a diffusers folder has ``image_encoder/`` (transformers'
``CLIPVisionModelWithProjection``), ``image_normalizer/`` (``mean``, ``std``) and
``image_noising_scheduler/``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from PIL import Image

from openldm.checkpoints.detect import read_json
from openldm.checkpoints.errors import CorruptCheckpointError, MissingWeightsError, UnknownArchitectureError
from openldm.nn.clip_vision import CLIPVisionEncoder, VisionConfig, preprocess
from openldm.nn.unet import timestep_embedding
from openldm.nn.upcast import compute_dtype

if TYPE_CHECKING:
    from openldm.pipelines.common import Model

StateDict = dict[str, torch.Tensor]
T = TypeVar("T")
NOISE_TIMESTEPS = 1000
COSINE_SCHEDULE = "squaredcos_cap_v2"


def cosine_alphas_cumprod(timesteps: int = NOISE_TIMESTEPS, max_beta: float = 0.999) -> torch.Tensor:
    """float64 ``alphas_cumprod`` of the squared-cosine schedule (Nichol & Dhariwal), betas capped."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), max_beta) for i in range(timesteps)
    ]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), dim=0)


@dataclass
class ImageEmbedder:
    """The CLIP image tower with the embedding statistics and the noise schedule of its augmentation."""

    encoder: CLIPVisionEncoder
    mean: torch.Tensor  # [1, D] float32
    std: torch.Tensor  # [1, D] float32
    alphas_cumprod: torch.Tensor  # [levels] float64

    @property
    def dim(self) -> int:
        return self.encoder.config.embed_dim

    @property
    def levels(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def embed(self, image: Image.Image) -> torch.Tensor:
        """[1, D] float32 embedding of a PIL image (CLIP preprocessing, then the tower)."""
        encoder = self.encoder
        device = encoder.conv1.weight.device
        pixels = preprocess(image, encoder.config.image_size).to(device, compute_dtype(encoder))
        return encoder(pixels).float()

    def condition(self, embeds: torch.Tensor, noise_level: int, noise: torch.Tensor) -> torch.Tensor:
        """``y`` [B, 2D]: the embeddings noised to ``noise_level`` with unit ``noise``, then the level's
        sinusoidal embedding."""
        self.check_level(noise_level)
        embeds = embeds.float()
        mean, std = self.mean.to(embeds.device), self.std.to(embeds.device)
        a = self.alphas_cumprod[noise_level]
        normalised = (embeds - mean) / std
        noised = float(a.sqrt()) * normalised + float((1 - a).sqrt()) * noise.to(embeds)
        levels = torch.full((embeds.shape[0],), noise_level, device=embeds.device)
        return torch.cat([noised * std + mean, timestep_embedding(levels, self.dim)], dim=1)

    def check_level(self, noise_level: int) -> None:
        if (
            isinstance(noise_level, bool)
            or not isinstance(noise_level, int)
            or not 0 <= noise_level < self.levels
        ):
            raise ValueError(
                f"noise_level must be a whole number from 0 to {self.levels - 1}, got {noise_level!r}"
            )


def read_embedding_stats(path: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of CLIP image embeddings from a file: the reference's ``ViT-L-14_stats.th`` (a pickled
    pair of tensors, read by the checkpoint pickle machine: no code runs) or a safetensors file with ``mean``
    and ``std``."""
    from openldm.checkpoints.read import read_safetensors, read_torch_zip, sniff

    file = Path(path)
    if not file.is_file():
        raise MissingWeightsError(file, "no such file", "Pass the path of ViT-L-14_stats.th")
    if sniff(file) == "safetensors":
        tensors = read_safetensors(file)
        pair: Any = (tensors.get("mean"), tensors.get("std"))
    else:
        pair = read_torch_zip(file)
    if not (
        isinstance(pair, (tuple, list))
        and len(pair) == 2
        and all(isinstance(t, torch.Tensor) for t in pair)
        and pair[0].shape == pair[1].shape
    ):
        raise CorruptCheckpointError(
            file,
            "it does not hold a (mean, std) pair of tensors of one shape",
            "Pass ViT-L-14_stats.th (the reference's CLIP-L embedding statistics)",
        )
    return pair[0].detach().float(), pair[1].detach().float()


def image_embedder(
    model: Model, embedding_stats: tuple[torch.Tensor, torch.Tensor] | None = None
) -> ImageEmbedder:
    """The image embedder of an unCLIP model: its CLIP image encoder (built when it loaded) with the
    embedding statistics and the noise schedule its extras carry.

    ``embedding_stats``: (mean, std) of the image embeddings, for a checkpoint that does not carry them
    (the reference's ``-l`` config reads them from ``ViT-L-14_stats.th``).
    """
    if model.spec.variant != "unclip":
        raise ValueError(f"this is a {model.spec.variant} model; image variations need an unCLIP model")
    extras, source, encoder = model.extras, model.source, model.image_encoder
    if encoder is None:
        why = model.unbuilt.get(
            "image_encoder", "it holds no CLIP image encoder (embedder.* or image_encoder/)"
        )
        raise MissingWeightsError(
            source, why, "Use the complete checkpoint (or diffusers folder), or pass image_embeds= yourself"
        )
    config = encoder.config
    folder = Path(source) if source and Path(source).is_dir() else None
    if "image_encoder" in extras:
        stats = _diffusers_stats(extras, source)
        alphas = _diffusers_schedule(folder)
    else:
        augmentor = extras.get("noise_augmentor", {})
        stats = _single_file_stats(augmentor, config, source)
        alphas = augmentor["alphas_cumprod"].double() if "alphas_cumprod" in augmentor else None
    if embedding_stats is not None:
        stats = embedding_stats
    if stats is None:
        raise MissingWeightsError(
            source,
            "it does not carry the statistics of the CLIP-L image embeddings "
            "(noise_augmentor.data_mean/data_std)",
            "Pass embedding_stats=(mean, std), e.g. torch.load('ViT-L-14_stats.th') as the reference's "
            "config does",
        )
    mean, std = (s.detach().float().reshape(1, -1) for s in stats)
    if mean.shape[1] != config.embed_dim or std.shape[1] != config.embed_dim:
        raise CorruptCheckpointError(
            source, f"the embedding statistics do not have {config.embed_dim} values", "Check the checkpoint"
        )
    device = next(encoder.parameters()).device
    return ImageEmbedder(
        encoder=encoder,
        mean=mean.to(device),
        std=std.to(device),
        alphas_cumprod=alphas if alphas is not None else cosine_alphas_cumprod(),
    )


def _diffusers_stats(extras: Mapping[str, StateDict], source: str) -> tuple[torch.Tensor, torch.Tensor]:
    normalizer = extras.get("image_normalizer", {})
    if "mean" not in normalizer or "std" not in normalizer:
        raise MissingWeightsError(
            source, "image_normalizer/ (the embedding statistics) is missing", "Download that folder"
        )
    return normalizer["mean"], normalizer["std"]


def _diffusers_schedule(folder: Path | None) -> torch.Tensor | None:
    path = folder / "image_noising_scheduler" / "scheduler_config.json" if folder is not None else None
    if path is None or not path.is_file():
        return None
    config = read_json(path, "image_noising_scheduler/scheduler_config.json")
    schedule = config.get("beta_schedule", COSINE_SCHEDULE)
    if schedule != COSINE_SCHEDULE:
        raise UnknownArchitectureError(
            path,
            f"beta_schedule {schedule!r} is not unCLIP's ({COSINE_SCHEDULE})",
            "Check the scheduler config",
        )
    return cosine_alphas_cumprod(int(config.get("num_train_timesteps", NOISE_TIMESTEPS)))


def _single_file_stats(
    augmentor: Mapping[str, torch.Tensor], config: VisionConfig, source: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    if "data_mean" in augmentor and "data_std" in augmentor:
        return augmentor["data_mean"], augmentor["data_std"]
    if config.activation == "gelu":  # the -h config gives no statistics: the identity normalisation
        return torch.zeros(1, config.embed_dim), torch.ones(1, config.embed_dim)
    return None
