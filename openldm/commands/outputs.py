"""Where the image commands write, checked before any work, and their PNGs, written whole or not at all.

A command writes ``OUTDIR/samples/00000.png``, ... numbered on from the files already there, and
``OUTDIR/grid-0000.png``, as the reference scripts do. :func:`check_output_folder` runs before the model
is loaded: a folder that is a file, cannot be created or is read-only is one error, not a traceback
after minutes of sampling. :func:`write_outputs` first writes every PNG to a temporary file beside its
destination; only when all of them are complete are they given their numbered names (a hard link, so a
name another process took meanwhile is never overwritten), and a failure removes what this call wrote:
no half-written PNG, no run that left some of its images and no grid.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from openldm.files import check_output_folder, new_file_beside
from openldm.images import image_grid, png_bytes

SAMPLE_NAME = re.compile(r"(\d{5})\.png")
GRID_NAME = re.compile(r"grid-(\d{4})\.png")


def check_image_outputs(outdir: str | os.PathLike[str], save_samples: bool) -> None:
    """The folders that :func:`write_outputs` will write to, checked before any work (not created)."""
    check_output_folder(outdir)
    if save_samples:
        check_output_folder(Path(outdir) / "samples", "--outdir's samples folder")


@dataclass
class _Staged:
    """A complete PNG under a temporary name, waiting for its numbered name in ``folder``."""

    temporary: Path
    folder: Path
    pattern: re.Pattern[str]
    name: str  # a format string taking the number


def write_outputs(
    outdir: str | os.PathLike[str],
    images: Sequence[Image.Image],
    *,
    save_samples: bool = True,
    grid_rows: int | None = None,
) -> list[Path]:
    """Write ``images`` as numbered samples (when ``save_samples``) and one grid of ``grid_rows`` per row
    (when given), each with its parameters; return the paths written, all or none."""
    outdir = Path(outdir)
    staged: list[_Staged] = []
    written: list[Path] = []
    (outdir / "samples" if save_samples else outdir).mkdir(parents=True, exist_ok=True)
    try:
        if save_samples:
            for image in images:
                staged.append(_stage(png_bytes(image), outdir / "samples", SAMPLE_NAME, "{:05}.png"))
        if grid_rows is not None and images:
            grid = image_grid(images, grid_rows)
            data = png_bytes(grid, images[0].info.get("parameters"))
            staged.append(_stage(data, outdir, GRID_NAME, "grid-{:04}.png"))
        numbers: dict[Path, int] = {}
        for item in staged:
            written.append(_commit(item, numbers))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    finally:
        for item in staged:
            item.temporary.unlink(missing_ok=True)
    return written


def _stage(data: bytes, folder: Path, pattern: re.Pattern[str], name: str) -> _Staged:
    handle, temporary = new_file_beside(folder / "openldm.png")
    staged = _Staged(temporary, folder, pattern, name)
    with os.fdopen(handle, "wb") as file:
        file.write(data)
    return staged


def next_number(folder: Path, pattern: re.Pattern[str]) -> int:
    """One more than the highest number of the files in ``folder`` whose names ``pattern`` matches."""
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.fullmatch(p.name))]
    return max(numbers, default=-1) + 1


def _commit(item: _Staged, numbers: dict[Path, int]) -> Path:
    """Give ``item`` the next free number of its folder, never replacing a file that is there."""
    number = numbers.get(item.folder)
    if number is None:
        number = next_number(item.folder, item.pattern)
    while True:
        target = item.folder / item.name.format(number)
        number += 1
        try:
            os.link(item.temporary, target)
        except FileExistsError:
            continue
        except OSError as e:  # a file system without hard links
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV) or target.exists():
                raise
            os.replace(item.temporary, target)
        numbers[item.folder] = number
        return target
