"""Writing files safely: output folders checked before any work, files written whole or not at all, and
nothing written into the installed package unless asked for by name."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


class OutputFolderError(ValueError):
    """An output folder that cannot be created or written to, or one inside the installed package."""


def check_output_folder(folder: str | os.PathLike[str], flag: str = "--outdir") -> Path:
    """Prove that ``folder`` can be written to, creating nothing: it is a folder (or can be made in its
    nearest existing ancestor, which is), and a temporary file can be written there and removed."""
    path = Path(folder)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is inside {str(existing)!r}, which is a file"
        raise OutputFolderError(f"{flag} {str(path)!r} {where}, not a folder; give a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        what = "is not writable" if existing == path else f"cannot be created in {str(existing)!r}"
        raise OutputFolderError(f"{flag} {str(path)!r} {what} ({_reason(e)}); give another folder") from None
    return path


def _reason(error: OSError) -> str:
    if isinstance(error, FileExistsError | NotADirectoryError):
        return "a part of the path is a file"
    return error.strerror or type(error).__name__


def inside_package(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` lies in the installed openldm package (its code and its packaged models)."""
    return Path(path).resolve().is_relative_to(PACKAGE_DIR)


def check_outside_package(path: str | os.PathLike[str], flag: str) -> None:
    """Refuse a default or run folder inside the package: it would overwrite what is installed."""
    if inside_package(path):
        raise OutputFolderError(
            f"{flag} {str(path)!r} lies inside the installed openldm package ({PACKAGE_DIR}); "
            "give a folder of your own"
        )


def new_file_beside(path: Path) -> tuple[int, Path]:
    """A new empty file with a unique hidden name in ``path``'s folder, open for writing: (descriptor,
    path). Its permissions follow the umask as any new file's (``mkstemp`` would make it private)."""
    for _ in range(100):
        temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temporary
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


@contextlib.contextmanager
def replaced_when_done(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed to ``path`` when the block ends without an
    error, removed otherwise: an interrupted or failed write leaves the old file (or none), never half
    of a new one."""
    path = Path(path)
    handle, temporary = new_file_beside(path)
    os.close(handle)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_atomically(data: bytes, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` to ``path`` whole or not at all (see :func:`replaced_when_done`)."""
    with replaced_when_done(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def file_hash(path: str | os.PathLike[str], skip_header: bool = False) -> str:
    """SHA-256 of a file (hex), read in 1 MB blocks; ``skip_header``: of a safetensors file's tensor
    bytes only (after its header), as the web UI hashes LoRAs."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if skip_header:
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
