"""The web UI's request shapes (``/sdapi/v1/txt2img``, ``img2img``), validated, and their options.

Fields are the web UI's names and defaults; the many it has that openldm does not use (``restore_faces``,
``styles``...) are accepted and ignored, as the web UI ignores those of extensions it lacks; of
``alwayson_scripts``, the ControlNet extension's is read (:mod:`openldm.server.controlnet_units`).
Images come as base64 PNG/JPEG (``data:`` prefixes allowed); their sizes are checked from their headers
before they are decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from openldm.pipelines.options import GenerationOptions
from openldm.sampling.samplers import SAMPLERS

MAX_PIXELS = 2048 * 2048  # output and input images
MAX_SIDE = 4096
Kind = Literal["txt2img", "img2img"]


class BadRequest(ValueError):
    """A request field that cannot be used; ``field`` names it (the answer is a 422)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = Field(20, ge=1, le=1000)
    cfg_scale: float = Field(7.0, ge=0, le=100)
    width: int = Field(512, ge=8, le=MAX_SIDE)
    height: int = Field(512, ge=8, le=MAX_SIDE)
    seed: int = Field(-1, ge=-1, lt=2**63)
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=64)
    n_iter: int = Field(1, ge=1, le=64)
    eta: float | None = Field(None, ge=0)
    clip_skip: int | None = Field(None, ge=1, le=12)
    send_images: bool = True
    override_settings: dict[str, Any] = Field(default_factory=dict)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(min_length=1, max_length=1)
    denoising_strength: float = Field(0.75, ge=0, le=1)
    mask: str | None = None


def sampler_key(name: str | None, scheduler: str | None) -> tuple[str, bool]:
    """Our sampler and Karras spacing from the web UI's ``sampler_name`` (``"Euler a"``, ``"DPM++ 2M
    Karras"``, ``"k_euler_a"``, or our own key) and ``scheduler`` (``"Karras"``)."""
    karras = (scheduler or "").lower() == "karras"
    if not name:
        return "euler_a", karras
    text = name.strip()
    if text.lower().endswith(" karras"):
        text, karras = text[: -len(" karras")], True
    for key, info in SAMPLERS.items():
        if text.lower() in (key, info.display_name.lower(), "k_" + key):
            return key, karras
    names = ", ".join(info.display_name for info in SAMPLERS.values())
    raise BadRequest("sampler_name", f"unknown sampler {name!r}; use one of: {names}")


def options_of(request: Txt2ImgRequest, clip_skip_default: int = 1) -> GenerationOptions:
    """The generation options a request asks for (checked now, before the job is queued)."""
    if request.width * request.height > MAX_PIXELS:
        raise BadRequest("width", f"{request.width}x{request.height} is more than {MAX_PIXELS} pixels")
    sampler, karras = sampler_key(request.sampler_name or request.sampler_index, request.scheduler)
    eta = request.eta if SAMPLERS[sampler].has_eta else None
    clip_skip = (
        request.clip_skip or request.override_settings.get("CLIP_stop_at_last_layers") or clip_skip_default
    )
    try:
        return GenerationOptions(
            request.prompt,
            request.negative_prompt,
            steps=request.steps,
            guidance_scale=request.cfg_scale,
            width=request.width,
            height=request.height,
            sampler=sampler,
            eta=eta,
            karras=karras,
            seed=None if request.seed < 0 else request.seed,
            n_samples=request.batch_size,
            n_iter=request.n_iter,
            clip_skip=int(clip_skip),
            token_merging=request.override_settings.get("token_merging_ratio", 0.0),
            progress=False,
        )
    except ValueError as e:
        raise BadRequest(getattr(e, "field", "request"), str(e)) from None


def decode_image(data: str, field: str) -> Image.Image:
    """A base64 image, its size checked from its header before its pixels are decoded."""
    text = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(field, f"{field} is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
    except Exception:  # PIL raises several kinds for data that is no image
        raise BadRequest(field, f"{field} is not a PNG, JPEG or WebP image") from None
    width, height = image.size
    if width * height > MAX_PIXELS or max(width, height) > MAX_SIDE:
        raise BadRequest(field, f"{field} is {width}x{height}: more than {MAX_PIXELS} pixels")
    try:
        image.load()
    except Exception:
        raise BadRequest(field, f"{field} is a damaged image") from None
    return image


def encode_png(image: Image.Image) -> str:
    from openldm.images import png_bytes

    return base64.b64encode(png_bytes(image)).decode("ascii")
