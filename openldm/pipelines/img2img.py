"""Image to image (SDEdit): encode the init image, noise it to ``strength``, denoise the remaining steps.

Of a ``steps``-step schedule, the last ``int(strength * steps)`` steps run: the init image's latent
(a sample of the VAE posterior, drawn with the run's generator) gets noise at the first sigma of those
steps, ``x = z + sigma * noise``, and the sampler walks from there. This is diffusers'
``StableDiffusionImg2ImgPipeline`` exactly (its ``get_timesteps`` and ``scheduler.add_noise``). The
reference's img2img script runs the same steps but noises one schedule level higher than the step it
starts at (``stochastic_encode`` at ``ddim_timesteps[t_enc]``, then ``decode`` from
``ddim_timesteps[t_enc - 1]``), and fails at strength 1; here the noise level is always the one the
first step expects, and strength 1 is plain text-to-image from pure noise at ``sigmas[0]`` (without
the DDIM family's rescaling of the first noise; the init image still shows through the tiny
``sqrt(alphas_cumprod)`` left at the top of the schedule). Strength 0 returns the encoded image.

As in the reference, the init image is encoded once per batch image (each gets its own posterior
sample) before the repeats; each repeat draws fresh noise from the same generator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from openldm.images import fit_to_multiple, load_image, pil_to_tensor
from openldm.pipelines.common import Generation, Model, check_size, check_strength, strength_sigmas
from openldm.pipelines.options import GenerationOptions, Prompt, build_options
from openldm.pipelines.run import Run, Task, generate

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from openldm.pipelines.options import OptionFields

InitImage = Image.Image | str | os.PathLike[str] | torch.Tensor


@dataclass
class Img2Img(Task):
    """The last ``int(strength * steps)`` steps from the init image's latent noised to their first sigma."""

    image: InitImage
    strength: float = 0.75
    name = "img2img"
    encodes = True
    pixels: torch.Tensor = field(init=False, repr=False)
    latent: torch.Tensor = field(init=False, repr=False)
    extra: dict[str, torch.Tensor] | None = field(init=False, default=None, repr=False)  # UNet inputs

    def __post_init__(self) -> None:
        check_strength(self.strength)

    def image_size(self, model: Model, options: GenerationOptions) -> tuple[int, int]:
        self.pixels = prepare_init_image(
            self.image, options.width, options.height, model.spec.vae.downsampling_factor
        )
        return int(self.pixels.shape[-2]), int(self.pixels.shape[-1])

    def settings(self) -> dict[str, Any]:
        return {"Denoising strength": self.strength}

    def schedule(self, sigmas: torch.Tensor, steps: int) -> torch.Tensor:
        return strength_sigmas(sigmas, steps, self.strength)

    def prepare(self, run: Run) -> None:
        self.latent = run.encode(self.pixels.expand(run.batch, -1, -1, -1))  # one posterior sample each

    def denoise(self, run: Run, unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if len(run.sigmas) == 1:
            x = self.latent.clone()
        else:
            x = run.sample(run.start(unit, self.latent), extra=self.extra)
        return x, run.decode(x)


def img2img(
    model: Model,
    prompt: Prompt,
    init_image: InitImage,
    negative_prompt: Prompt = "",
    *,
    strength: float = 0.75,
    **options: Unpack[OptionFields],
) -> Generation:
    """Repaint ``init_image`` after ``prompt``; ``strength`` in [0, 1] is how much of it is redrawn.

    ``init_image``: a PIL image, an image file, or a tensor [1, 3, H, W] in [-1, 1]. It is resized to
    ``width`` x ``height`` when given, else down to the nearest multiple of 8 per side. ``noise`` (unit
    variance, the latent's shape) replaces the noise drawn for every repeat. The other options are
    :class:`~openldm.pipelines.options.GenerationOptions`'.
    """
    return generate(model, Img2Img(init_image, strength), build_options(prompt, negative_prompt, options))


def prepare_init_image(
    image: InitImage, width: int | None, height: int | None, multiple: int
) -> torch.Tensor:
    """The init image as a float32 tensor [1, 3, H, W] in [-1, 1] with sides multiples of ``multiple``."""
    if isinstance(image, str | os.PathLike):
        image = load_image(image)
    if isinstance(image, torch.Tensor):
        tensor = image[None] if image.ndim == 3 else image
        if tensor.ndim != 4 or tensor.shape[:2] != (1, 3):
            raise ValueError(f"init_image tensor must be [1, 3, H, W] in [-1, 1], got {list(image.shape)}")
        if width is not None or height is not None:
            raise ValueError("width and height resize PIL init images; resize the tensor yourself")
        check_size(int(tensor.shape[-1]), int(tensor.shape[-2]), multiple)
        return tensor.float()
    if not isinstance(image, Image.Image):
        raise ValueError(f"init_image must be a PIL image, a path or a tensor, got {type(image).__name__}")
    if width is not None or height is not None:
        size = (width or image.width, height or image.height)
        check_size(size[0], size[1], multiple)
        image = image if image.size == size else image.resize(size, resample=Image.Resampling.LANCZOS)
    return pil_to_tensor(fit_to_multiple(image, multiple))
