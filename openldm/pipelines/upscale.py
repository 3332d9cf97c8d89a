"""The x4 upscaler: a low-resolution image and a prompt in, an image four times its size out.

The model (the reference's ``LatentUpscaleDiffusion``) denoises a latent of the low-res image's size
with the low-res image concatenated to it (4 + 3 = 7 UNet input channels): the image in [-1, 1] is
first noised to ``noise_level`` with its own schedule, ``sqrt(a) * image + sqrt(1 - a) * noise``
(the reference's ``low_scale_model.q_sample``, diffusers' ``low_res_scheduler.add_noise``), and the
noise level is the UNet's class label. The VAE (scale factor 0.08333, two downsamplings) decodes the
latent to four times the low-res size. More noise lets the model invent more detail and depart
further from the input; the model was trained with levels 0 to ``max_noise_level`` (350).

The low-res schedule comes from, in order: the checkpoint's own ``low_scale_model.alphas_cumprod``
(or ``.betas``) buffers (original single files); a diffusers folder's
``low_res_scheduler/scheduler_config.json`` (read as diffusers reads it, its ``DDPMScheduler``
defaults included) and ``model_index.json``'s ``max_noise_level``; the ``low_scale_config`` of a yaml
given to ``openldm.load(..., config=)``; else the reference config's (``x4-upscaling.yaml``): betas
from 1e-4 to 0.02 linear in sqrt space, 1000 levels, at most 350. A yaml's ``max_noise_level`` holds
for a single file's buffers too (the reference builds the augmentation from the yaml, then loads the
buffers over it).

Seeds: from one CPU generator the run draws the low-res noise [1, 3, h, w] (shared by the batch)
and then the starting latents [n, 4, h, w], per repeat, as diffusers' ``StableDiffusionUpscalePipeline``
does with a CPU generator; stochastic samplers continue the same generator.

Tiling (``tile``): memory grows with the image (the UNet's attention with the square of the latent
area, the VAE decoder with the 4x pixel area), so large inputs can be processed in overlapping tiles
of ``tile`` low-res pixels, each upscaled on its own and decoded, and cross-faded with a smooth
window across the overlaps (:mod:`openldm.pipelines.tiles`). Every tile sees the crop of the very
noise the untiled run would draw, so overlapping tiles start from the same noise and a single tile
covering the image gives the untiled result bit for bit. With several tiles the result is not the
untiled one: each tile sees only its own context (the prompt applies to every tile; a tile may
repeat an object the prompt names), and seams are hidden rather than absent. Larger tiles and
overlaps cost memory and time and give results closer to the untiled image; peak memory is that of
one tile plus the float32 output canvas.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from openldm.images import load_image, pil_to_tensor
from openldm.pipelines.common import Generation, Model
from openldm.pipelines.options import GenerationOptions, Prompt, build_options
from openldm.pipelines.run import Run, Task, generate
from openldm.pipelines.tiles import Tile, crop, tile_by_tile, tiles

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from openldm.pipelines.options import OptionFields

LowResImage = Image.Image | str | os.PathLike[str] | torch.Tensor

VARIANT = "x4-upscaler"
# diffusers' StableDiffusionUpscalePipeline defaults.
DEFAULTS: dict[str, Any] = {"steps": 75, "guidance_scale": 9.0}
MIN_SIDE = 8  # low-res pixels; the UNet's deepest level needs a few latent pixels
MIN_TILE = 16
# The reference's x4-upscaling.yaml: low_scale_config.params.
REFERENCE_BETAS = (0.0001, 0.02, 1000)
REFERENCE_MAX_NOISE_LEVEL = 350
DEFAULT_NOISE_LEVEL = 20  # the reference's and diffusers' default
# diffusers' DDPMScheduler defaults, for keys a low_res_scheduler config leaves out.
_DDPM_DEFAULTS: dict[str, Any] = {
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "num_train_timesteps": 1000,
    "trained_betas": None,
}


# --- the low-res noise augmentation ------------------------------------------------------------


@dataclass(frozen=True)
class LowResSchedule:
    """The schedule the low-res image is noised with, and the highest noise level trained."""

    alphas_cumprod: torch.Tensor  # float64 [levels]
    max_noise_level: int
    source: str

    def add_noise(self, image: torch.Tensor, noise: torch.Tensor, level: int) -> torch.Tensor:
        """``image`` noised to ``level``: ``sqrt(a) * image + sqrt(1 - a) * noise``, in float32."""
        a = self.alphas_cumprod[level]
        return (float(a.sqrt()) * image.float() + float((1 - a).sqrt()) * noise.float()).float()


def _betas(kind: str, start: float, end: float, count: int) -> torch.Tensor:
    if kind == "linear":
        return torch.linspace(start, end, count, dtype=torch.float64)
    if kind == "scaled_linear":  # the reference's "linear": linear in sqrt space
        return torch.linspace(start**0.5, end**0.5, count, dtype=torch.float64) ** 2
    raise ValueError(
        f"low-res noise schedule {kind!r} is not supported; the x4 upscaler uses 'scaled_linear' "
        "(fix low_res_scheduler/scheduler_config.json)"
    )


def _from_betas(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas.double(), dim=0)


def _checked(alphas_cumprod: torch.Tensor, where: str) -> torch.Tensor:
    ac = alphas_cumprod.detach().to("cpu", torch.float64).reshape(-1)
    valid = ac.numel() > 0 and bool(torch.isfinite(ac).all()) and bool(((ac > 0) & (ac <= 1)).all())
    if not valid or not bool((ac[1:] <= ac[:-1]).all()):
        raise ValueError(
            f"{where} is not a noise schedule (values must decrease within (0, 1]); "
            "the checkpoint is damaged: use the original file"
        )
    return ac


def _folder_schedule(folder: Path) -> LowResSchedule | None:
    path = folder / "low_res_scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    try:
        config = {**_DDPM_DEFAULTS, **json.loads(path.read_text(encoding="utf-8"))}
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} or model_index.json ({e}); download the folder again") from e
    if config["trained_betas"] is not None:
        alphas_cumprod = _from_betas(torch.tensor(config["trained_betas"], dtype=torch.float64))
    else:
        betas = _betas(
            config["beta_schedule"],
            float(config["beta_start"]),
            float(config["beta_end"]),
            int(config["num_train_timesteps"]),
        )
        alphas_cumprod = _from_betas(betas)
    max_level = int(index.get("max_noise_level", REFERENCE_MAX_NOISE_LEVEL))
    return LowResSchedule(_checked(alphas_cumprod, str(path)), max_level, str(path))


def low_res_schedule(model: Model) -> LowResSchedule:
    """The low-res augmentation schedule of ``model`` (see the module docstring for the order)."""
    buffers = model.extras.get("low_scale_model", {})
    config = model.extras.get("low_scale_config", {})  # a reference yaml's, given to load()
    max_level = int(config["max_noise_level"]) if "max_noise_level" in config else REFERENCE_MAX_NOISE_LEVEL
    # As in the reference, the checkpoint's buffers win over the yaml's schedule (not its max level).
    if "alphas_cumprod" in buffers:
        ac = _checked(buffers["alphas_cumprod"], "low_scale_model.alphas_cumprod")
        return LowResSchedule(ac, max_level, "low_scale_model.alphas_cumprod")
    if "betas" in buffers:
        ac = _checked(_from_betas(buffers["betas"].double()), "low_scale_model.betas")
        return LowResSchedule(ac, max_level, "low_scale_model.betas")
    source = Path(model.source) if model.source else None
    if source is not None and source.is_dir() and (schedule := _folder_schedule(source)) is not None:
        return schedule
    start, end, count = REFERENCE_BETAS
    where = "the yaml's low_scale_config" if config else "the reference config"
    start = float(config.get("linear_start", start))
    end = float(config.get("linear_end", end))
    count = int(config.get("timesteps", count))
    return LowResSchedule(
        _checked(_from_betas(_betas("scaled_linear", start, end, count)), where), max_level, where
    )


# --- checks and inputs -------------------------------------------------------------------------


def _whole(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
    return value


def checked_schedule(model: Model, noise_level: int) -> LowResSchedule:
    """The model's low-res schedule, with ``noise_level`` checked against it and the UNet's labels."""
    schedule = low_res_schedule(model)
    classes = model.spec.unet.num_classes
    check_noise_level(noise_level, schedule, classes if isinstance(classes, int) else 0)
    return schedule


def check_noise_level(noise_level: int, schedule: LowResSchedule, classes: int) -> None:
    top = min(schedule.max_noise_level, schedule.alphas_cumprod.numel() - 1, classes - 1)
    if isinstance(noise_level, bool) or not isinstance(noise_level, int) or not 0 <= noise_level <= top:
        raise ValueError(
            f"noise level must be a whole number from 0 to {top} for this model, got {noise_level!r}"
        )


def check_tiling(tile: int | None, overlap: int | None) -> tuple[int | None, int]:
    """(tile, overlap) in low-res pixels; overlap defaults to min(32, tile // 4)."""
    if tile is None:
        if overlap is not None:
            raise ValueError("tile_overlap needs tile (the tile size in low-res pixels)")
        return None, 0
    _whole("tile", tile, MIN_TILE)
    if overlap is None:
        return tile, min(32, tile // 4)
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap <= tile // 2:
        raise ValueError(
            f"tile_overlap must be a whole number from 0 to tile / 2 = {tile // 2}, got {overlap!r}"
        )
    return tile, overlap


def prepare_low_res(image: LowResImage, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The low-res image as a float32 tensor [1, 3, h, w] in [-1, 1], at least 8 pixels a side; its
    given augmentation ``noise`` must have its shape."""
    if isinstance(image, str | os.PathLike):
        image = load_image(image)
    if isinstance(image, Image.Image):
        tensor = pil_to_tensor(image)
    elif isinstance(image, torch.Tensor):
        tensor = image[None] if image.ndim == 3 else image
        if tensor.ndim != 4 or tensor.shape[:2] != (1, 3):
            raise ValueError(f"the image tensor must be [1, 3, H, W] in [-1, 1], got {list(image.shape)}")
        tensor = tensor.detach().float()
    else:
        raise ValueError(f"image must be a PIL image, a path or a tensor, got {type(image).__name__}")
    height, width = tensor.shape[-2:]
    if height < MIN_SIDE or width < MIN_SIDE:
        raise ValueError(
            f"the low-res image is {width}x{height}; it must be at least {MIN_SIDE} pixels a side"
        )
    if noise is not None and tuple(noise.shape) != (1, 3, height, width):
        raise ValueError(f"image_noise must have shape {[1, 3, height, width]}, got {list(noise.shape)}")
    return tensor


# --- the pipeline ------------------------------------------------------------------------------


@dataclass
class Upscale(Task):
    """The latent at the low-res image's size, with the noised image as extra channels and its noise
    level as the class label; sampled and decoded tile by tile (one tile: the whole image)."""

    image: LowResImage
    noise_level: int = DEFAULT_NOISE_LEVEL
    tile: int | None = None
    tile_overlap: int | None = None
    image_noise: torch.Tensor | None = None
    name = "upscale"
    variants = (VARIANT,)
    needs = "upscale needs an x4 upscaler checkpoint"
    low_res: torch.Tensor = field(init=False, repr=False)
    pieces: list[Tile] = field(init=False, repr=False)
    noised: torch.Tensor = field(init=False, repr=False)
    augmentation: LowResSchedule = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.tile, self.tile_overlap = check_tiling(self.tile, self.tile_overlap)

    def image_size(self, model: Model, options: GenerationOptions) -> tuple[int, int]:
        if options.width is not None or options.height is not None:
            raise ValueError("upscale's output is 4x the image's size; it takes no width or height")
        self.augmentation = checked_schedule(model, self.noise_level)
        self.low_res = prepare_low_res(self.image, self.image_noise)
        height, width = (int(side) for side in self.low_res.shape[-2:])
        self.pieces = tiles(height, width, self.tile or max(height, width), self.tile_overlap or 0)
        factor = model.spec.vae.downsampling_factor
        return height * factor, width * factor

    def tile_latent(self) -> tuple[int, int] | None:
        return (self.pieces[0].height, self.pieces[0].width) if self.tile is not None else None

    def settings(self) -> dict[str, Any]:
        overlap = self.tile_overlap if self.tile is not None else None
        return {"Noise level": self.noise_level, "Tile size": self.tile, "Tile overlap": overlap}

    def passes(self) -> int:
        return len(self.pieces)

    def before_noise(self, run: Run, iteration: int) -> None:
        # The low-res image's noise is drawn before the starting latents (diffusers' order).
        augment = self.image_noise if self.image_noise is not None else run.draw((1, *self.low_res.shape[1:]))
        low_res, augment = self.low_res.to(run.device), augment.to(run.device)
        self.noised = self.augmentation.add_noise(low_res, augment, self.noise_level)

    def denoise(self, run: Run, unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        label, start = torch.tensor([self.noise_level], dtype=torch.long), run.start(unit)

        def run_tile(piece: Tile) -> tuple[torch.Tensor, torch.Tensor | None]:
            x = run.sample(crop(start, piece), extra={"c_concat": crop(self.noised, piece), "y": label})
            return x, run.decode(x)

        images = (run.batch, 3, *run.size) if run.options.output_type != "latent" else None
        factor = run.model.spec.vae.downsampling_factor
        return tile_by_tile(self.pieces, run.shape, images, factor, run.device, run_tile)


def upscale(
    model: Model,
    prompt: Prompt,
    image: LowResImage,
    negative_prompt: Prompt = "",
    *,
    noise_level: int = DEFAULT_NOISE_LEVEL,
    tile: int | None = None,
    tile_overlap: int | None = None,
    image_noise: torch.Tensor | None = None,
    **options: Unpack[OptionFields],
) -> Generation:
    """Upscale ``image`` four times (per side) with the x4 upscaler, guided by ``prompt``.

    Args:
        image: a PIL image, an image file, or a tensor [1, 3, h, w] in [-1, 1]; any size of at
            least 8 pixels a side (the output is exactly 4x; no resizing or padding).
        noise_level: how much noise the low-res image gets before conditioning, 0 to the model's
            ``max_noise_level`` (350); 20 by default, as the reference and diffusers.
        tile: process the image in overlapping tiles of ``tile`` x ``tile`` low-res pixels (>= 16);
            None: all at once. See the module docstring for the memory/quality trade-off.
        tile_overlap: low-res pixels neighbouring tiles share, 0 to ``tile / 2`` (default
            ``min(32, tile // 4)``).
        image_noise: the low-res augmentation noise [1, 3, h, w] (instead of drawing it).
        The other options are :class:`~openldm.pipelines.options.GenerationOptions`' (defaults 75 steps
        and scale 9, diffusers' for this model; no width or height). ``Generation.latents`` are at the
        low-res size (blended across tiles when tiled); ``noise`` is the starting latents [batch, 4, h, w].
    """
    task = Upscale(image, noise_level, tile, tile_overlap, image_noise)
    return generate(model, task, build_options(prompt, negative_prompt, options, DEFAULTS))
