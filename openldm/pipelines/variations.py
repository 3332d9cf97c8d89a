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
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image

from openldm.images import load_image
from openldm.pipelines.common import (
    Callback,
    Generation,
    Sampling,
    autocast,
    batch_prompts,
    check_options,
    check_request_memory,
    check_size,
    check_weights_precision,
    conditioning,
    device_of,
    draw_noise,
    make_generator,
    progress_bar,
    prompt_count,
    run_repeats,
    run_settings,
    sampler_options,
    sampling_sigmas,
    size_multiple,
    unit_noise,
)
from openldm.pipelines.image_embedding import ImageEmbedder, image_embedder

if TYPE_CHECKING:
    from openldm.checkpoints.load import StableDiffusion

ImageInput = Image.Image | str | os.PathLike[str]


def variations(
    model: StableDiffusion,
    image: ImageInput | None,
    prompt: str | Sequence[str] = "",
    negative_prompt: str | Sequence[str] = "",
    *,
    noise_level: int = 0,
    steps: int = 20,
    guidance_scale: float = 10.0,
    width: int | None = None,
    height: int | None = None,
    sampler: str = "ddim",
    seed: int | None = None,
    n_samples: int = 1,
    n_iter: int = 1,
    eta: float | None = None,
    karras: bool = False,
    weighting: bool = True,
    callback: Callback | None = None,
    output_type: str = "pil",
    precision: str | None = None,
    noise: torch.Tensor | None = None,
    fixed_code: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = True,
    image_embeds: torch.Tensor | None = None,
    embedding_noise: torch.Tensor | None = None,
    embedding_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    embedder: ImageEmbedder | None = None,
) -> Generation:
    """Variations of ``image``, optionally steered by ``prompt``.

    Args:
        image: a PIL image or an image file (ignored when ``image_embeds`` is given; may then be None).
        noise_level: how much noise the image embedding gets, 0 to 999: higher gives freer variations.
        image_embeds: a CLIP image embedding [1, D] to use instead of embedding ``image``.
        embedding_noise: the unit noise [1, D] for the embedding (instead of drawing it).
        embedding_stats: (mean, std) of the embeddings, for a CLIP-L single file without them.
        embedder: a prebuilt :func:`~openldm.pipelines.image_embedding.image_embedder` (saves rebuilding it).

    The other options are :func:`openldm.pipelines.txt2img.txt2img`'s; the defaults (20 steps, guidance
    10, DDIM) are diffusers'.
    """
    info = check_options(
        model,
        steps=steps,
        guidance_scale=guidance_scale,
        sampler=sampler,
        n_samples=n_samples,
        n_iter=n_iter,
        output_type=output_type,
        precision=precision,
        variants=("unclip",),
        needs="image variations need an unCLIP model",
    )
    check_weights_precision(model, precision)
    embedder = embedder if embedder is not None else image_embedder(model, embedding_stats)
    embedder.check_level(noise_level)
    picture = _image(image) if image_embeds is None else None
    width = width if width is not None else model.spec.image_size
    height = height if height is not None else model.spec.image_size
    factor = model.spec.vae.downsampling_factor
    check_size(width, height, size_multiple(model))
    check_request_memory(
        model,
        images=prompt_count(prompt) * n_samples,
        repeats=n_iter,
        width=width,
        height=height,
        guidance_scale=guidance_scale,
        precision=precision,
        output_type=output_type,
    )
    prompts, negatives = batch_prompts(prompt, negative_prompt, n_samples)
    options = sampler_options(sampler, info, eta)
    seed, generator = make_generator(seed, generator)
    device = device_of(model.unet)
    shape = (len(prompts), model.spec.vae.embed_dim, height // factor, width // factor)
    for name, given, wanted in (
        ("noise", noise, shape),
        ("image_embeds", image_embeds, (1, embedder.dim)),
        ("embedding_noise", embedding_noise, (1, embedder.dim)),
    ):
        if given is not None and tuple(given.shape) != wanted:
            raise ValueError(f"{name} must have shape {list(wanted)}, got {list(given.shape)}")
    sigmas = sampling_sigmas(model, info, steps, karras)
    run = run_settings(
        model,
        info,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        width=width,
        height=height,
        karras=karras,
        eta=options.get("eta"),
        extra={"Noise level": noise_level},
    )

    with torch.inference_mode():
        # 1. Encode the prompts and the image; noise the image embedding.
        with autocast(device, precision):
            cond, uncond = conditioning(model, prompts, negatives, guidance_scale, weighting)
            embeds = embedder.embed(picture) if picture is not None else image_embeds.float().to(device)
        if embedding_noise is None:
            embedding_noise = draw_noise(generator, (1, embedder.dim), device)
        y = embedder.condition(embeds.to(device), noise_level, embedding_noise).expand(len(prompts), -1)
        bar = progress_bar(n_iter * (len(sigmas) - 1), progress, "variations")
        # The unconditional branch sees y = 0, as the reference's unCLIP script and diffusers.
        sample = Sampling(
            model,
            info,
            sigmas,
            cond,
            uncond,
            guidance_scale,
            generator,
            options,
            precision,
            callback,
            bar,
            extra_cond={"y": y},
            extra_uncond={"y": torch.zeros_like(y)},
        )
        if noise is None and fixed_code:
            noise = draw_noise(generator, shape, device)

        def sample_one(iteration: int) -> torch.Tensor:
            # 2. The starting noise, scaled to the sampler's first sigma; 3. sample (4. decode).
            return sample(unit_noise(generator, shape, device, noise) * info.initial_sigma(sigmas))

        result = run_repeats(
            model,
            n_iter,
            sample_one,
            prompts=prompts,
            negatives=negatives,
            run=run,
            seed=seed,
            output_type=output_type,
            precision=precision,
        )
        bar.close()
    return result


def _image(image: ImageInput | None) -> Image.Image:
    if image is None:
        raise ValueError("variations need an image (or image_embeds=)")
    if isinstance(image, str | os.PathLike):
        image = load_image(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image or a path, got {type(image).__name__}")
    return image
