"""Inpainting: repaint the white part of a mask, keep the black part.

Two ways, chosen by the model:

* **Inpainting models** (9 UNet input channels, ``variant == "inpaint"``): the UNet sees, after the noisy
  latent, the mask downsampled to latent size (nearest neighbour) and the latent of the masked image
  (the init image with the repainted pixels set to 0, i.e. grey, encoded by the VAE: a posterior
  sample, scaled), in that channel order, as the reference's ``c_concat = [mask, masked_image]`` and
  diffusers' ``StableDiffusionInpaintPipeline`` do. Nothing else changes: the text conditioning and the
  sampler are txt2img's (strength 1) or img2img's (strength < 1).
* **Plain text-to-image models** (4 channels): latent blending. At every denoiser call, the kept region
  of the latent the UNet sees is replaced by the init latent noised to the current sigma
  (``z + sigma * noise``, with the run's starting noise), and the kept region of the returned x0 is
  ``z`` itself; after the last step the kept region is set to ``z``. This is the reference DDIM's
  ``mask`` argument and diffusers' legacy 4-channel path put into denoiser form, so it works with every
  sampler of the registry: for a deterministic sampler at strength < 1 the sampler's own latent stays
  exactly ``z + sigma_i * noise`` in the kept region, which is what diffusers' per-step replacement
  gives (the two agree). At strength 1 the UNet also sees the noised init latent in the kept region at
  the first step (diffusers shows it pure noise there; the reference blends there too). The model has
  not learned to respect the seam, so expect it to show; inpainting models do much better.

Masks: a PIL image or file (converted to grey levels), or a tensor in [0, 1]; binarised at 0.5 (white
= repaint). A mask of another size than the init image is resized with it when it has the init image's
aspect ratio (within 1%), and rejected otherwise (it most likely belongs to another image).

Seeds follow diffusers': one VAE posterior sample of the init image (strength < 1, or a 4-channel
model), then the starting noise, then one posterior sample of the masked image (9 channels), all
from the run's CPU generator; the encoded images are shared by the whole batch and by the repeats.

``paste_back=True`` copies the kept pixels of the init image (at the working size) into the decoded
images, exactly: the same bytes in the PIL output, the same values in the ``np``/``pt`` output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from openldm.images import fit_to_multiple, load_image, open_image, pil_to_tensor, to_unit, unit_to_uint8
from openldm.pipelines.common import (
    TEXT_TO_IMAGE_VARIANTS,
    Generation,
    Model,
    check_size,
    check_strength,
    strength_sigmas,
)
from openldm.pipelines.img2img import InitImage, prepare_init_image
from openldm.pipelines.options import GenerationOptions, Prompt, build_options
from openldm.pipelines.run import Run, Task, generate

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from openldm.pipelines.options import OptionFields

MaskImage = Image.Image | str | os.PathLike[str] | torch.Tensor
INPAINT_VARIANTS = ("inpaint", *TEXT_TO_IMAGE_VARIANTS)
ASPECT_TOLERANCE = 0.01


@dataclass
class Inpaint(Task):
    """Repaint the white part of the mask: 9-channel models see it, 4-channel ones blend latents."""

    image: InitImage
    mask: MaskImage
    strength: float = 1.0
    paste_back: bool = False
    name = "inpaint"
    variants = INPAINT_VARIANTS
    needs = f"inpainting needs an inpainting model or a text-to-image model ({', '.join(INPAINT_VARIANTS)})"
    encodes = True
    init: WorkingImage = field(init=False, repr=False)
    repaint: torch.Tensor = field(init=False, repr=False)  # [1, 1, H, W], 1 = repaint
    mask_latent: torch.Tensor = field(init=False, repr=False)
    latent: torch.Tensor | None = field(init=False, default=None, repr=False)  # the init image's
    extra: dict[str, torch.Tensor] | None = field(init=False, default=None, repr=False)  # 9 channels
    channels: bool = field(init=False, default=False)  # the UNet also reads [mask, masked latent]

    def __post_init__(self) -> None:
        check_strength(self.strength)

    def image_size(self, model: Model, options: GenerationOptions) -> tuple[int, int]:
        multiple = model.spec.vae.downsampling_factor
        self.init = prepare_image(self.image, options.width, options.height, multiple)
        height, width = self.init.tensor.shape[-2:]
        self.repaint = prepare_mask(self.mask, width, height, self.init.source_size)
        return height, width

    def settings(self) -> dict[str, Any]:
        return {"Denoising strength": self.strength}

    def schedule(self, sigmas: torch.Tensor, steps: int) -> torch.Tensor:
        return strength_sigmas(sigmas, steps, self.strength)

    def prepare(self, run: Run) -> None:
        self.mask_latent = latent_mask(self.repaint, run.shape[-2:]).to(run.device)
        self.channels = run.model.spec.unet.in_channels > run.model.spec.vae.embed_dim
        self.extra = None  # encoded at the first repeat, after its starting noise, as diffusers does
        self.latent = None if self.channels and self.strength == 1.0 else run.encode(self.init.tensor)

    def denoise(self, run: Run, unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.channels and self.extra is None:
            masked = run.encode(masked_images(self.init.tensor, self.repaint))
            self.extra = {"c_concat": torch.cat([self.mask_latent, masked], dim=1)}
        blend = None if self.channels else LatentBlend(_required(self.latent), self.mask_latent >= 0.5, unit)
        if len(run.sigmas) == 1:
            x = _required(self.latent).expand(run.shape).clone()
        else:
            start = run.start(unit, None if self.strength == 1.0 else _required(self.latent))
            x = run.sample(start, extra=self.extra, hook=blend)
        x = x if blend is None else blend.finish(x)
        return x, run.decode(x)

    def finish(self, result: Generation) -> Generation:
        if self.paste_back and result.images is not None:
            result.images = paste_kept_pixels(result.images, self.init, self.repaint >= 0.5)
        return result


def inpaint(
    model: Model,
    prompt: Prompt,
    image: InitImage,
    mask: MaskImage,
    negative_prompt: Prompt = "",
    *,
    strength: float = 1.0,
    paste_back: bool = False,
    **options: Unpack[OptionFields],
) -> Generation:
    """Repaint the white part of ``mask`` in ``image`` after ``prompt``; the black part is kept.

    Args:
        image: the init image, as :func:`openldm.pipelines.img2img.img2img` takes it (resized to
            ``width`` x ``height`` when given, else down to a multiple of 8 per side).
        mask: a PIL image, an image file or a tensor ([H, W], [1, H, W] or [1, 1, H, W]) in [0, 1];
            white (>= 0.5) = repaint, black = keep. Resized with the image when it has its aspect ratio.
        strength: how much of the masked region is redrawn; 1 (the default) starts from pure noise,
            below 1 the last ``int(strength * steps)`` steps run from the noised init image as in img2img.
        paste_back: copy the kept pixels of the init image exactly into the output images.
        The other options are :class:`~openldm.pipelines.options.GenerationOptions`'; ``noise`` is the
        unit starting noise [batch, 4, H/8, W/8] (also the noise of the blended kept region).
    """
    task = Inpaint(image, mask, strength, paste_back)
    return generate(model, task, build_options(prompt, negative_prompt, options))


# --- checks and inputs -------------------------------------------------------------------------


def _required(z: torch.Tensor | None) -> torch.Tensor:
    if z is None:  # the control flow above encodes the init image whenever this is reached
        raise RuntimeError("the init image was not encoded")
    return z


@dataclass(frozen=True)
class WorkingImage:
    """The init image at the working size: ``tensor`` [1, 3, H, W] in [-1, 1] (what is encoded), and
    what paste-back copies: ``pixels`` uint8 [H, W, 3] and ``unit`` float32 [1, 3, H, W] in [0, 1]
    (the PIL image's bytes / 255, or a tensor's values); ``source_size`` (width, height) before resizing."""

    tensor: torch.Tensor
    pixels: np.ndarray
    unit: torch.Tensor
    source_size: tuple[int, int]


def prepare_image(image: InitImage, width: int | None, height: int | None, multiple: int) -> WorkingImage:
    """The init image resized as img2img resizes it, with its exact pixels kept for paste-back."""
    if isinstance(image, str | os.PathLike):
        image = load_image(image)
    if isinstance(image, torch.Tensor):
        tensor = prepare_init_image(image, width, height, multiple)
        size = (int(tensor.shape[-1]), int(tensor.shape[-2]))
        unit = to_unit(tensor)
        return WorkingImage(tensor, unit_to_uint8(unit)[0], unit, size)
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image, a path or a tensor, got {type(image).__name__}")
    source = image.size
    image = image.convert("RGB")
    if width is not None or height is not None:
        size = (width or image.width, height or image.height)
        check_size(size[0], size[1], multiple)
        image = image if image.size == size else image.resize(size, resample=Image.Resampling.LANCZOS)
    image = fit_to_multiple(image, multiple)
    pixels = np.asarray(image).copy()
    unit = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    return WorkingImage(pil_to_tensor(image), pixels, unit, source)


def latent_mask(masks: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Pixel masks ``[B, 1, H, W]`` (1 = repaint) at latent ``size`` (nearest): the mask channel of
    9-channel models, and the blend mask of 4-channel ones."""
    return F.interpolate(masks.float(), size=tuple(size))


def masked_images(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] with the repainted pixels set to 0: what 9-channel models see encoded."""
    return images * (masks < 0.5)


def prepare_mask(
    mask: MaskImage, width: int, height: int, source_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """The mask as float32 [1, 1, height, width] of 0 (keep) and 1 (repaint), binarised at 0.5.

    A PIL mask of another size is resized (LANCZOS, then binarised, as diffusers does) when its aspect
    ratio is the init image's (``source_size``, before resizing; default the working size).
    """
    if isinstance(mask, str | os.PathLike):
        mask = load_mask(mask)
    if isinstance(mask, torch.Tensor):
        tensor = mask.detach().float().cpu()
        if not 2 <= tensor.ndim <= 4 or tuple(tensor.shape) != (1,) * (tensor.ndim - 2) + (height, width):
            raise ValueError(
                f"a mask tensor must be [H, W], [1, H, W] or [1, 1, H, W] with H x W = {height} x {width} "
                f"(the image's size), got {list(mask.shape)}"
            )
        return (tensor.reshape(1, 1, height, width) >= 0.5).float()
    if not isinstance(mask, Image.Image):
        raise ValueError(f"mask must be a PIL image, a path or a tensor, got {type(mask).__name__}")
    grey = mask.convert("L")
    if grey.size != (width, height):
        source = source_size or (width, height)
        if abs(grey.width * source[1] / (grey.height * source[0]) - 1) > ASPECT_TOLERANCE:
            raise ValueError(
                f"the mask is {grey.width}x{grey.height} but the image is {source[0]}x{source[1]}: "
                "give a mask of the image's size (or at least its aspect ratio)"
            )
        grey = grey.resize((width, height), resample=Image.Resampling.LANCZOS)
    array = np.asarray(grey, dtype=np.float32) / 255.0
    return torch.from_numpy(array >= 0.5).float()[None, None]


def load_mask(path: str | os.PathLike[str], what: str = "mask image") -> Image.Image:
    """Open a mask file as grey levels; a missing or unreadable file is a ``ValueError`` naming it."""
    return open_image(path, what, "L")


# --- sampling ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentBlend:
    """Latent blending for models without mask channels (see the module's docstring).

    ``init``: the init latent [1 or B, 4, h, w]; ``repaint``: bool [1, 1, h, w], True where the model
    paints; ``noise``: the unit noise [B, 4, h, w] that the kept region carries.
    """

    init: torch.Tensor
    repaint: torch.Tensor
    noise: torch.Tensor

    def __call__(self, denoiser: Any, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        level = torch.as_tensor(sigma).to(x.device, x.dtype).reshape(-1, 1, 1, 1)
        x = torch.where(self.repaint, x, self.init + level * self.noise)
        return torch.where(self.repaint, denoiser(x, sigma).float(), self.init)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.repaint, x, self.init)


# --- paste-back --------------------------------------------------------------------------------


def paste_kept_pixels(
    images: list[Any] | np.ndarray | torch.Tensor, init: WorkingImage, repaint: torch.Tensor
) -> list[Any] | np.ndarray | torch.Tensor:
    """The output images with the kept pixels (``repaint`` False, [1, 1, H, W]) of the init image.

    PIL images get the init image's bytes (their parameters text is kept); ``np`` / ``pt`` outputs
    in [0, 1] get its values in [0, 1].
    """
    keep = ~repaint[0, 0].numpy()
    if isinstance(images, list):
        pasted = []
        for image in images:
            array = np.asarray(image).copy()
            array[keep] = init.pixels[keep]
            out = Image.fromarray(array)
            out.info.update(image.info)
            pasted.append(out)
        return pasted
    if isinstance(images, np.ndarray):
        return np.where(keep[None, :, :, None], init.unit.permute(0, 2, 3, 1).numpy(), images)
    return torch.where(torch.from_numpy(keep)[None, None], init.unit, images)
