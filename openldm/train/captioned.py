"""Training data as people keep it: images with captions, read once, checked up front.

Three layouts are read:

* a folder of images with same-named ``.txt`` captions (``cat.png`` + ``cat.txt``), subfolders too;
* a folder with a ``metadata.jsonl`` (the image-folder convention: one ``{"file_name": ..., "text":
  ...}`` per line; ``caption`` is taken for ``text``);
* webdataset ``.tar`` shards: members grouped by their key (``000.jpg`` + ``000.txt`` or ``000.json``
  with a ``caption``/``text``).

Every image is decoded when the data is opened, so that a run never fails in its middle: an image
that cannot be read (damaged, not an image, over :data:`MAX_PIXELS`) and one without a caption are
listed in :class:`DataReport`; ``on_problem="stop"`` makes any of them an error naming the files,
``"skip"`` leaves them out and counts them. Images are then placed in aspect-ratio buckets (sizes that
are multiples of 64 with about ``resolution**2`` pixels) and resized to cover their bucket and cropped.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_PIXELS = 64 * 1024 * 1024
MAX_CAPTION_BYTES = 64 * 1024
BUCKET_STEP = 64
OnProblem = Literal["skip", "stop"]


class DataError(ValueError):
    """Training data that cannot be used as asked."""


@dataclass(frozen=True)
class Sample:
    name: str  # where it came from: a path, or "shard.tar:key"
    image: Image.Image  # RGB
    caption: str


@dataclass
class DataReport:
    """What was found: the usable samples, and the images left out and why."""

    samples: list[Sample] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    uncaptioned: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.samples)} images with captions; {len(self.unreadable)} unreadable, "
            f"{len(self.uncaptioned)} without a caption left out"
        )


def _decode(data: bytes, name: str) -> Image.Image:
    """An RGB image, its size checked from its header before its pixels are decoded."""
    image = Image.open(io.BytesIO(data))
    if image.width * image.height > MAX_PIXELS:
        raise ValueError(f"{image.width}x{image.height} is over {MAX_PIXELS} pixels")
    image = ImageOps.exif_transpose(image)
    return image.convert("RGB")


def _caption(data: bytes) -> str | None:
    if len(data) > MAX_CAPTION_BYTES:
        return None
    text = data.decode("utf-8", errors="replace").strip()
    return text or None


def _add(report: DataReport, name: str, data: bytes | None, caption: str | None) -> None:
    if data is None:
        return
    try:
        image = _decode(data, name)
    except Exception as e:  # PIL raises many kinds for files that are not images
        report.unreadable.append((name, f"{type(e).__name__}: {e}"[:200]))
        return
    if caption is None:
        report.uncaptioned.append(name)
        return
    report.samples.append(Sample(name, image, caption))


def _folder(root: Path, report: DataReport) -> None:
    metadata = root / "metadata.jsonl"
    captions: dict[str, str] = {}
    if metadata.is_file():
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                captions[str(entry["file_name"])] = str(entry.get("text", entry.get("caption", ""))).strip()
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{metadata}: line {number} is not a JSON object with a file_name") from None
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        relative = path.relative_to(root).as_posix()
        if metadata.is_file():
            caption = captions.get(relative) or None
        else:
            text_file = path.with_suffix(".txt")
            caption = _caption(text_file.read_bytes()) if text_file.is_file() else None
        _add(report, str(path), path.read_bytes(), caption)


def _shard(path: Path, report: DataReport) -> None:
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile() or member.size > MAX_PIXELS * 4:
                    continue
                key, _, suffix = member.name.rpartition(".")
                handle = tar.extractfile(member)
                if key and handle is not None:
                    groups.setdefault(key, {})[suffix.lower()] = handle.read()
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{path}: not a readable tar shard ({e})") from None
    for key, parts in sorted(groups.items()):
        image = next((parts[s[1:]] for s in IMAGE_SUFFIXES if s[1:] in parts), None)
        caption = _caption(parts["txt"]) if "txt" in parts else None
        if caption is None and "json" in parts:
            try:
                entry = json.loads(parts["json"])
                caption = str(entry.get("caption", entry.get("text", ""))).strip() or None
            except (ValueError, AttributeError):
                caption = None
        _add(report, f"{path.name}:{key}", image, caption)


def read_captioned(source: str | Path, on_problem: OnProblem = "skip") -> DataReport:
    """The images and captions of ``source`` (a folder, or a ``.tar`` shard, or a folder of shards)."""
    root = Path(source)
    report = DataReport()
    if root.is_file() and root.suffix == ".tar":
        _shard(root, report)
    elif root.is_dir():
        shards = sorted(root.glob("*.tar"))
        for shard in shards:
            _shard(shard, report)
        if not shards:
            _folder(root, report)
    else:
        raise DataError(f"{source}: no such folder or .tar shard")
    problems = [f"{name} ({why})" for name, why in report.unreadable] + [
        f"{name} (no caption)" for name in report.uncaptioned
    ]
    if problems and on_problem == "stop":
        shown = "; ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DataError(f"{len(problems)} images cannot be used: {shown}")
    if not report.samples:
        raise DataError(f"{source}: no image with a caption found ({report.summary()})")
    return report


def buckets(resolution: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) sizes: multiples of 64, about ``resolution**2`` pixels, aspect up to ``max_ratio``."""
    area = resolution * resolution
    sizes = set()
    for width in range(BUCKET_STEP, int(resolution * math.sqrt(max_ratio)) + BUCKET_STEP, BUCKET_STEP):
        height = max(BUCKET_STEP, int(area / width) // BUCKET_STEP * BUCKET_STEP)
        if max(width / height, height / width) <= max_ratio:
            sizes.add((width, height))
            sizes.add((height, width))
    return sorted(sizes)


def bucket_of(image: Image.Image, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log scale)."""
    aspect = math.log(image.width / image.height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))


def fit(image: Image.Image, size: tuple[int, int], offset: float = 0.5) -> torch.Tensor:
    """``image`` resized to cover ``size`` (width, height) and cropped (``offset`` 0..1 along the long
    side: 0.5 is a centre crop), as ``[3, H, W]`` in [-1, 1]."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.LANCZOS
    )
    left = round((resized.width - width) * offset)
    top = round((resized.height - height) * offset)
    array = np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def bucketed(report: DataReport, resolution: int) -> dict[tuple[int, int], list[Sample]]:
    """The samples grouped by bucket (each batch is drawn from one bucket)."""
    sizes = buckets(resolution)
    groups: dict[tuple[int, int], list[Sample]] = {}
    for sample in report.samples:
        groups.setdefault(bucket_of(sample.image, sizes), []).append(sample)
    return groups
