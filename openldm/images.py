"""Images in and out: PIL <-> tensors, grids, and PNGs that carry their generation parameters.

Tensors are NCHW in [-1, 1] (what the VAE reads and writes). Pixels are quantised as the reference
scripts do it, ``(255 * x).astype(uint8)`` on values clamped to [0, 1]: truncation, not rounding, so
a PNG written here has the bytes the reference would write for the same decoded image.

The ``parameters`` text chunk follows the popular web UI's layout, which other tools read::

    a photo of a cat
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: v1-5

the prompt (one or more lines), a ``Negative prompt:`` line when there is one, then one line of
``key: value`` pairs separated by ", " (a value holding ",", ":" or a newline is JSON-quoted).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from openldm.files import write_atomically

PARAMETERS_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"
# One "key: value" pair of the last line; a value is either JSON-quoted or runs to the next comma.
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|\{[^{}]*\}|[^,]*)(?:,|$)')
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


# --- PIL <-> tensors ---------------------------------------------------------------------------


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image -> float32 tensor [1, 3, H, W] in [-1, 1] (the reference's ``load_img``)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous() * 2.0 - 1.0


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped, float32 on the CPU."""
    return ((images.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)


def unit_to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [0, 1] -> uint8 [N, H, W, C], truncating like the reference scripts."""
    return (255.0 * images.permute(0, 2, 3, 1).numpy()).astype(np.uint8)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [-1, 1] -> N RGB images."""
    return [Image.fromarray(array) for array in unit_to_uint8(to_unit(images))]


def fit_to_multiple(image: Image.Image, multiple: int = 8) -> Image.Image:
    """``image`` resized down to the nearest multiple of ``multiple`` per side (LANCZOS, as the reference)."""
    width, height = image.size
    size = (width - width % multiple, height - height % multiple)
    if size[0] < multiple or size[1] < multiple:
        raise ValueError(f"the image is {width}x{height}; it must be at least {multiple}x{multiple} pixels")
    return image if size == image.size else image.resize(size, resample=Image.Resampling.LANCZOS)


def open_image(path: str | os.PathLike[str], what: str, mode: str) -> Image.Image:
    """Open an image file in ``mode`` ("RGB", "L"...); a missing, unreadable or non-image file is a
    ``ValueError`` that calls it ``what`` ("init image", "--mask"...)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a folder; give an image file")
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises these for broken or non-image files
        raise ValueError(f"cannot read {what} {str(path)!r} as an image ({e})") from None


def load_image(path: str | os.PathLike[str], what: str = "init image") -> Image.Image:
    """Open an image file as RGB (see :func:`open_image`)."""
    return open_image(path, what, "RGB")


# --- grids -------------------------------------------------------------------------------------


def image_grid(images: Sequence[Image.Image], n_rows: int, padding: int = 2) -> Image.Image:
    """Images tiled ``n_rows`` to a row (the reference's ``make_grid(nrow=n_rows)``, 2 black pixels apart).

    As in the reference the count is per row: ``n_rows`` images side by side, as many rows as needed.
    All images must have the size of the first.
    """
    if not images:
        raise ValueError("a grid needs at least one image")
    if n_rows < 1:
        raise ValueError(f"n_rows must be >= 1, got {n_rows}")
    width, height = images[0].size
    columns = min(n_rows, len(images))
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * (width + padding) + padding, rows * (height + padding) + padding))
    for i, image in enumerate(images):
        if image.size != (width, height):
            raise ValueError(f"grid images must all be {width}x{height}, image {i} is {image.size}")
        row, column = divmod(i, columns)
        grid.paste(
            image.convert("RGB"), (column * (width + padding) + padding, row * (height + padding) + padding)
        )
    return grid


# --- generation parameters ---------------------------------------------------------------------


def _quote(value: Any) -> str:
    if isinstance(value, dict):  # Civitai's "Hashes: {...}": JSON, not quoted
        return json.dumps(value, ensure_ascii=False)
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def format_parameters(
    prompt: str, negative_prompt: str = "", settings: Mapping[str, Any] | None = None
) -> str:
    """The web UI's ``parameters`` text: the prompt, the negative prompt, then ``settings`` in order.

    ``settings`` maps display names to values (``{"Steps": 20, "Sampler": "Euler a", "CFG scale": 7.5}``);
    ``None`` values are left out.
    """
    pairs = ", ".join(f"{key}: {_quote(v)}" for key, v in (settings or {}).items() if v is not None)
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{pairs}".strip()


def _value(text: str) -> Any:
    if text.startswith('"') and text.endswith('"') and len(text) > 1:
        return json.loads(text)
    if text.startswith("{") and text.endswith("}"):
        try:
            return json.loads(text)
        except ValueError:
            return text
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


def parse_parameters(text: str) -> dict[str, Any]:
    """The inverse of :func:`format_parameters`.

    Returns ``{"Prompt": ..., "Negative prompt": ..., "Steps": 20, "Sampler": "Euler a", ...}``:
    whole numbers as ``int``, other numbers as ``float``, everything else as ``str`` (``Size`` stays
    ``"512x512"``). The last line holds the settings when it has at least three ``key: value`` pairs,
    as the web UI decides it.
    """
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if not negative and line.startswith(NEGATIVE_PREFIX):
            negative.append(line[len(NEGATIVE_PREFIX) :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    result: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PAIR.findall(last):
        result[key.strip()] = _value(value.strip())
    return result


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """``image`` encoded as a PNG with a ``parameters`` tEXt chunk (default: ``image.info["parameters"]``)."""
    text = parameters if parameters is not None else image.info.get(PARAMETERS_KEY)
    info = PngImagePlugin.PngInfo()
    if text:
        info.add_text(PARAMETERS_KEY, text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, path: str | os.PathLike[str], parameters: str | None = None) -> Path:
    """Save ``image`` as a PNG with a ``parameters`` tEXt chunk (default: ``image.info["parameters"]``),
    atomically (see :func:`write_atomically`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(png_bytes(image, parameters), path)


def read_parameters(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The generation parameters stored in a PNG (see :func:`parse_parameters`); ``{}`` when it has none."""
    with Image.open(path) as image:
        text = image.info.get(PARAMETERS_KEY)
    return parse_parameters(text) if isinstance(text, str) else {}
