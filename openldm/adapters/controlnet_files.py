"""ControlNet and T2I-Adapter files found by name, as the web UI's ControlNet extension lists them
(``name [hash8]``, the first 8 hex digits of the file's SHA-256), and the networks read kept for the
next generation that names them.

The folders are the model's ``add_controlnet_dir`` ones; the embedded model also has its own
(``embedded-controlnet``). A name is a file name without its suffix, never a path.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import torch

from openldm.adapters.state import Adapters
from openldm.checkpoints.controlnet_file import read_controlnet
from openldm.checkpoints.packaged import EMBEDDED_PRESET, embedded_controlnet_file
from openldm.config import ModelSpec
from openldm.files import file_hash

SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
NETWORKS_KEPT = 2  # a full-size ControlNet is 1.4 GB in fp32: keep the last two read, not every one
_TITLE = re.compile(r"(?P<name>.+?) \[(?P<hash>[0-9a-fA-F]{8,64})\]")
_hashes: dict[tuple[str, int, int], str] = {}  # by path, size and mtime: a file is hashed once


class ControlNetModel(Protocol):
    spec: ModelSpec
    unet: torch.nn.Module
    adapters: Adapters


def controlnet_files(model: ControlNetModel) -> list[Path]:
    """Every ControlNet file of the model's folders (subfolders too), the embedded model's own first."""
    return files_in(model.adapters.controlnet_dirs, embedded=model.spec.name == EMBEDDED_PRESET)


def files_in(folders: list[Path], embedded: bool) -> list[Path]:
    found = [embedded_controlnet_file()] if embedded else []
    for folder in folders:
        found += [p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in SUFFIXES]
    return found


def short_hash(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hashes:
        _hashes[key] = file_hash(path)[:8]
    return _hashes[key]


def title(path: Path) -> str:
    return f"{path.stem} [{short_hash(path)}]"


def find_controlnet(name: str, files: list[Path]) -> Path:
    """The file of ``files`` named ``name`` (``stem`` or the web UI's ``stem [hash]``, whose hash must
    then match)."""
    wanted, digest = name.strip(), None
    if m := _TITLE.fullmatch(wanted):
        wanted, digest = m["name"], m["hash"].lower()
    if not wanted or wanted != Path(wanted).name or wanted in (".", ".."):
        raise ValueError(f"ControlNet name {name!r} must be a file name (no folders)")
    for path in files:
        if path.stem == wanted:
            if digest is not None and short_hash(path) != digest[:8]:
                raise ValueError(
                    f"ControlNet {wanted!r} has another hash than {digest[:8]}: the file changed"
                )
            return path
    known = ", ".join(p.stem for p in files) or "none (no --controlnet-dir given)"
    raise FileNotFoundError(f"no ControlNet named {wanted!r}; there are: {known}")


def controlnet_network(model: ControlNetModel, path: Path) -> Any:
    """The network of ``path`` fitted to ``model``, read once and kept for the next uses."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    kept: OrderedDict[tuple[str, int, int], Any] = model.adapters.controlnets
    if key in kept:
        kept.move_to_end(key)
        return kept[key]
    network = read_controlnet(path, model.unet)
    kept[key] = network
    while len(kept) > NETWORKS_KEPT:
        kept.popitem(last=False)
    return network
