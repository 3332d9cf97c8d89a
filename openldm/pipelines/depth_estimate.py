"""Depth by the MiDaS DPT-hybrid estimator: the input sized as the reference's MiDaS transform, and the
``depth`` preprocessor of ControlNets and T2I-Adapters."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

MIDAS_SIZE = 384  # the DPT-hybrid estimator's training size
MIDAS_MULTIPLE = 32


def midas_input_size(height: int, width: int, target: int = MIDAS_SIZE) -> tuple[int, int]:
    """The reference MiDaS transform's size: keep the aspect, scale nearest 1 to reach ``target``, x32."""
    scale_h, scale_w = target / height, target / width
    scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h

    def multiple(x: float) -> int:
        return max(MIDAS_MULTIPLE, int(np.round(x / MIDAS_MULTIPLE)) * MIDAS_MULTIPLE)

    return multiple(scale * height), multiple(scale * width)


def estimate_depth_with(estimator: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """MiDaS depth [1, h, w] (larger is nearer) of ``image`` [1, 3, H, W] in [-1, 1], at the size of
    :func:`midas_input_size` (the estimator on its own device and dtype)."""
    parameter = next(estimator.parameters())
    size = midas_input_size(int(image.shape[-2]), int(image.shape[-1]))
    x = F.interpolate(image.float(), size=size, mode="bicubic", align_corners=False).clamp(-1.0, 1.0)
    with torch.inference_mode():
        return estimator(x.to(parameter.device, parameter.dtype)).float()


def depth_control_image(estimator: nn.Module, picture: Image.Image) -> Image.Image:
    """The ``depth`` preprocessor: the MiDaS depth of ``picture`` (``estimator``: see
    :func:`~openldm.checkpoints.extras.read_depth_estimator`), at the picture's size, stretched to
    0..255 (nearest white), grey in RGB, as the depth ControlNets and T2I-Adapters were trained on."""
    array = np.asarray(picture.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    depth = estimate_depth_with(estimator, torch.from_numpy(array).permute(2, 0, 1)[None])
    depth = F.interpolate(depth[None], size=(picture.height, picture.width), mode="bicubic")[0, 0]
    depth = (depth - depth.min()) / (depth.max() - depth.min()).clamp_min(1e-8)
    grey = (depth * 255.0).clamp(0, 255).round().to(torch.uint8).numpy()
    return Image.fromarray(grey).convert("RGB")
