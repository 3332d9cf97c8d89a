"""DreamBooth's class images: what the base model makes of the class prompt, generated once and kept.

Prior preservation trains on these beside the user's images so that the class ("a photo of a dog")
keeps meaning what it meant. They are made by the model before it is trained, image ``i`` from seed
``seed + i``, and stored in the class folder as ``class-0000.png`` with its caption in
``class-0000.txt``; a later run finds them there and makes only the missing ones (images the user put
in the folder, with captions, count too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from openldm.files import write_atomically
from openldm.images import save_png
from openldm.train.captioned import DataError, read_captioned


def missing_class_images(folder: Path, count: int) -> list[int]:
    """Indices ``i < count`` with no ``class-i.png`` yet, once the folder's captioned images are counted."""
    try:
        have = len(read_captioned(folder, "skip").samples)
    except DataError:  # no captioned image yet
        have = 0
    free: list[int] = []
    index = 0
    while len(free) < count - have:
        if not (folder / f"class-{index:04d}.png").exists():
            free.append(index)
        index += 1
    return free


def make_class_images(
    model: Any,
    folder: str | Path,
    prompt: str,
    count: int,
    size: int,
    seed: int = 0,
    steps: int = 25,
    progress: bool = True,
) -> int:
    """Fill ``folder`` up to ``count`` captioned images of ``prompt`` (``size`` x ``size``); returns how
    many were generated now."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    missing = missing_class_images(folder, count)
    for index in tqdm(missing, desc="class images", disable=not progress or not missing):
        result = model.txt2img(
            prompt, seed=seed + index, steps=steps, height=size, width=size, progress=False
        )
        image = result.images[0]
        write_atomically((prompt + "\n").encode(), folder / f"class-{index:04d}.txt")
        save_png(image, folder / f"class-{index:04d}.png", result.parameters[0])
    return len(missing)
