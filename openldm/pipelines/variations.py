"""Image variations with an unCLIP model: embed the image with CLIP, noise the embedding, sample, decode.

The image is not encoded by the VAE: only its CLIP image embedding conditions the UNet, as the class
vector ``y`` (see :mod:`openldm.pipelines.image_embedding`), next to the prompt's cross-attention
context. The embedding is noised once per call (the noise drawn from the run's generator before the
starting latents) and shared by every image of the batch, as diffusers' ``StableUnCLIPImg2ImgPipeline``
does. The unconditional branch of classifier-free guidance gets the negative prompt and ``y = 0`` (the
reference's unCLIP script and diffusers both use zeros).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from openldm.images import load_image
from openldm.pipelines.common import Generation, Model, autocast
from openldm.pipelines.image_embedding import ImageEmbedder, image_embedder
from openldm.pipelines.options import GenerationOptions, Prompt, build_options
from openldm.pipelines.run import Run, Task, generate

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from openldm.pipelines.options import OptionFields

ImageInput = Image.Image | str | os.PathLike[str]
# diffusers' StableUnCLIPImg2ImgPipeline defaults.
DEFAULTS: dict[str, Any] = {"steps": 20, "guidance_scale": 10.0}


@dataclass
class Variations(Task):
    """Text to image with the image's noised CLIP embedding as the UNet's class vector ``y``."""

    image: ImageInput | None
    noise_level: int = 0
    image_embeds: torch.Tensor | None = None
    embedding_noise: torch.Tensor | None = None
    embedding_stats: tuple[torch.Tensor, torch.Tensor] | None = None
    embedder: ImageEmbedder | None = None
    name = "variations"
    variants = ("unclip",)
    needs = "variations need an unCLIP model (such as sd21-unclip-h)"
    picture: Image.Image | None = field(init=False, default=None, repr=False)
    y: torch.Tensor = field(init=False, repr=False)

    def image_size(self, model: Model, options: GenerationOptions) -> tuple[int, int]:
        if self.embedder is None:
            self.embedder = image_embedder(model, self.embedding_stats)
        self.embedder.check_level(self.noise_level)
        self.picture = _image(self.image) if self.image_embeds is None else None
        for name, given in (("image_embeds", self.image_embeds), ("embedding_noise", self.embedding_noise)):
            if given is not None and tuple(given.shape) != (1, self.embedder.dim):
                raise ValueError(f"{name} must have shape {[1, self.embedder.dim]}, got {list(given.shape)}")
        return super().image_size(model, options)

    def settings(self) -> dict[str, Any]:
        return {"Noise level": self.noise_level}

    def prepare(self, run: Run) -> None:
        embedder = _required(self.embedder)
        with autocast(run.device, run.options.precision):
            embeds = (
                embedder.embed(self.picture) if self.picture is not None else _required(self.image_embeds)
            )
        noise = self.embedding_noise if self.embedding_noise is not None else run.draw((1, embedder.dim))
        embeds = embeds.float().to(run.device)
        self.y = embedder.condition(embeds, self.noise_level, noise).expand(run.batch, -1)

    def denoise(self, run: Run, unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The unconditional branch sees y = 0, as the reference's unCLIP script and diffusers.
        x = run.sample(run.start(unit), extra={"y": self.y}, extra_uncond={"y": torch.zeros_like(self.y)})
        return x, run.decode(x)


def variations(
    model: Model,
    image: ImageInput | None,
    prompt: Prompt = "",
    negative_prompt: Prompt = "",
    *,
    noise_level: int = 0,
    image_embeds: torch.Tensor | None = None,
    embedding_noise: torch.Tensor | None = None,
    embedding_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    embedder: ImageEmbedder | None = None,
    **options: Unpack[OptionFields],
) -> Generation:
    """Variations of ``image``, optionally steered by ``prompt``.

    Args:
        image: a PIL image or an image file (ignored when ``image_embeds`` is given; may then be None).
        noise_level: how much noise the image embedding gets, 0 to 999: higher gives freer variations.
        image_embeds: a CLIP image embedding [1, D] to use instead of embedding ``image``.
        embedding_noise: the unit noise [1, D] for the embedding (instead of drawing it).
        embedding_stats: (mean, std) of the embeddings, for a CLIP-L single file without them.
        embedder: a prebuilt :func:`~openldm.pipelines.image_embedding.image_embedder` (saves rebuilding it).

    The other options are :class:`~openldm.pipelines.options.GenerationOptions`'; the defaults (20 steps,
    guidance 10, DDIM) are diffusers'.
    """
    task = Variations(image, noise_level, image_embeds, embedding_noise, embedding_stats, embedder)
    return generate(model, task, build_options(prompt, negative_prompt, options, DEFAULTS))


def _required(value: Any) -> Any:
    if value is None:  # the task's image_size step set it
        raise RuntimeError("the image embedder was not prepared")
    return value


def _image(image: ImageInput | None) -> Image.Image:
    if image is None:
        raise ValueError("variations need an image (or image_embeds=)")
    if isinstance(image, str | os.PathLike):
        image = load_image(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image or a path, got {type(image).__name__}")
    return image
