"""Depth to image: img2img with the depth model, whose UNet also reads the depth map (5 input channels).

The depth map is resized to the latent size (bicubic) and normalised per image to [-1, 1] with its
minimum and maximum, ``2 * (d - min) / (max - min) - 1`` (the reference's depth2img scripts and
diffusers' ``StableDiffusionDepth2ImgPipeline``); it is concatenated to the scaled latent at every step,
the same for the conditional and unconditional halves of guidance. Larger values are nearer (MiDaS
predicts inverse depth); a map in which far is larger gives an inverted scene.

The map is the user's (``depth_map=``: an image, a ``.npy`` array, a tensor), or estimated from the
init image by the MiDaS DPT-hybrid estimator whose weights the original depth checkpoint carries
(``depth_model.*``; see :mod:`openldm.nn.midas`). The estimator sees the init image resized as the
reference's MiDaS transform does (aspect kept, sides multiples of 32, the scale nearest 1 that brings
one side to 384; bicubic) in [-1, 1]. Sampling is :func:`openldm.pipelines.img2img.img2img`'s:
``int(strength * steps)`` steps from the init image's latent noised to their first sigma.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from openldm.pipelines.common import Generation, Model, check_strength
from openldm.pipelines.depth_estimate import estimate_depth_with
from openldm.pipelines.img2img import Img2Img, InitImage
from openldm.pipelines.options import GenerationOptions, Prompt, build_options
from openldm.pipelines.run import Run, generate

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from openldm.pipelines.options import OptionFields

DepthMap = Image.Image | np.ndarray | torch.Tensor | str | os.PathLike[str]
DEPTH_VARIANT = "depth"


class MissingDepthEstimatorError(ValueError):
    """No depth map was given and the checkpoint carries no depth estimator to make one."""


# --- depth maps --------------------------------------------------------------------------------


def read_depth_map(depth_map: DepthMap) -> torch.Tensor:
    """A depth map as a float32 tensor [B, H, W] (B = 1 for an image or a 2-D array).

    Accepts a PIL image (grayscale, 16-bit and float images keep their values; RGB is read as
    luminance), a ``.npy`` file or another image file, a numpy array or a tensor shaped [H, W],
    [B, H, W] or [B, 1, H, W].
    """
    if isinstance(depth_map, str | os.PathLike):
        depth_map = _read_depth_file(Path(depth_map))
    if isinstance(depth_map, Image.Image):
        depth_map = _image_values(depth_map)
    if isinstance(depth_map, np.ndarray):
        if not (np.issubdtype(depth_map.dtype, np.floating) or np.issubdtype(depth_map.dtype, np.integer)):
            raise ValueError(f"depth map array must hold numbers, got dtype {depth_map.dtype}")
        depth_map = torch.from_numpy(np.ascontiguousarray(depth_map, dtype=np.float32))
    if not isinstance(depth_map, torch.Tensor):
        raise ValueError(
            "depth_map must be a PIL image, a numpy array, a tensor or a path to an image or .npy file, "
            f"got {type(depth_map).__name__}"
        )
    depth = depth_map.detach().float()
    if depth.ndim == 4 and depth.shape[1] == 1:
        depth = depth[:, 0]
    elif depth.ndim == 2:
        depth = depth[None]
    if depth.ndim != 3 or min(depth.shape) < 1:
        raise ValueError(
            f"depth map must be shaped [H, W], [B, H, W] or [B, 1, H, W], got {list(depth_map.shape)}"
        )
    if not torch.isfinite(depth).all():
        raise ValueError("depth map holds NaN or infinite values")
    return depth


def _read_depth_file(path: Path) -> np.ndarray | Image.Image:
    if path.is_dir():
        raise ValueError(f"depth map {str(path)!r} is a folder; give an image or .npy file")
    if not path.is_file():
        raise ValueError(f"depth map {str(path)!r} does not exist")
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read depth map {str(path)!r} as a .npy array ({e})") from None
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read depth map {str(path)!r} as an image or .npy file ({e})") from None


def _image_values(image: Image.Image) -> np.ndarray:
    """Pixel values as float32 [H, W]: 16-bit, 32-bit and float images as stored, others as luminance."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return np.asarray(image, dtype=np.float32)
    return np.asarray(image.convert("L"), dtype=np.float32)


def normalize_depth(depth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, H, W] or [B, 1, H, W] depth -> [B, 1, h, w] at ``size`` (bicubic), each map spread over [-1, 1].

    A constant map has no depth information; it becomes -1 everywhere (the limit of the reference's
    training-time formula, which adds 0.001 to ``max - min``) instead of NaN.
    """
    depth = depth[:, None] if depth.ndim == 3 else depth
    depth = F.interpolate(depth.float(), size=size, mode="bicubic", align_corners=False)
    low = torch.amin(depth, dim=(1, 2, 3), keepdim=True)
    high = torch.amax(depth, dim=(1, 2, 3), keepdim=True)
    spread = high - low
    return torch.where(spread > 0, 2.0 * (depth - low) / spread.clamp_min(1e-30) - 1.0, -1.0)


def depth_estimator(model: Model) -> nn.Module:
    """The MiDaS DPT-hybrid estimator the checkpoint carries (``depth_model.*``, built when it loaded)."""
    if model.depth_estimator is None:
        why = model.unbuilt.get(
            "depth_estimator", "the checkpoint carries no depth estimator (no depth_model.*)"
        )
        raise MissingDepthEstimatorError(
            f"no depth map given and {why}; pass a depth map (depth_map= an image, a .npy file or an array; "
            "--depth-map on the command line), or load the original 512-depth-ema checkpoint, which "
            "carries the MiDaS estimator"
        )
    return model.depth_estimator


def estimate_depth(model: Model, image: torch.Tensor) -> torch.Tensor:
    """MiDaS depth [1, h, w] (larger is nearer) of ``image`` [1, 3, H, W] in [-1, 1]."""
    return estimate_depth_with(depth_estimator(model), image)


# --- the pipeline ------------------------------------------------------------------------------


@dataclass
class Depth2Img(Img2Img):
    """img2img whose UNet also reads the depth map, normalised at latent size, as extra channels."""

    depth_map: DepthMap | None = None
    strength: float = 0.8
    name = "depth2img"
    variants = (DEPTH_VARIANT,)
    needs = "depth2img needs a depth model (a UNet with 5 input channels, such as 512-depth-ema)"
    given: torch.Tensor | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        check_strength(self.strength)
        self.given = read_depth_map(self.depth_map) if self.depth_map is not None else None

    def image_size(self, model: Model, options: GenerationOptions) -> tuple[int, int]:
        batch = options.images_per_repeat
        if self.given is not None and self.given.shape[0] not in (1, batch):
            raise ValueError(
                f"depth map batch must be 1 or one map per image ({batch}), got {self.given.shape[0]}"
            )
        return super().image_size(model, options)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "Depth map": "given" if self.given is not None else "MiDaS"}

    def prepare(self, run: Run) -> None:
        raw = self.given if self.given is not None else estimate_depth(run.model, self.pixels)
        self.extra = {"c_concat": normalize_depth(raw, run.shape[-2:]).to(run.device)}
        super().prepare(run)


def depth2img(
    model: Model,
    prompt: Prompt,
    image: InitImage,
    negative_prompt: Prompt = "",
    *,
    depth_map: DepthMap | None = None,
    strength: float = 0.8,
    **options: Unpack[OptionFields],
) -> Generation:
    """Redraw ``image`` after ``prompt`` keeping its depth; ``strength`` in [0, 1] is how much is redrawn.

    ``depth_map``: the depth of ``image`` (larger is nearer), any size: a PIL image, an image or
    ``.npy`` file, or an array/tensor [H, W], [B, H, W] or [B, 1, H, W] with B = 1 or one map per
    generated image; None estimates it with the checkpoint's MiDaS estimator. The other options are
    :func:`openldm.pipelines.img2img.img2img`'s (``image`` is its ``init_image``).
    """
    task = Depth2Img(image, strength, depth_map=depth_map)
    return generate(model, task, build_options(prompt, negative_prompt, options))
