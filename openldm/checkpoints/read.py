"""Reading checkpoint files into state dicts without running code from them.

Two containers are supported, recognised by their first bytes (the suffix is only used in messages):

* ``.safetensors``: memory-mapped through the ``safetensors`` library; nothing is copied until used.
* PyTorch's zip format (``.ckpt``, ``.pt``, ``.bin``): the ``data.pkl`` pickle is run by
  :class:`~openldm.checkpoints.pickle_machine.PickleMachine`, a machine of this package's that knows
  the opcodes checkpoints use and nothing else. Globals come from an explicit allowlist of names mapped
  onto functions of this module (nothing the file names is imported or called); every other name is
  refused with :class:`UnsafeCheckpointError` before anything happens; nothing shared between loads can
  be changed by a file. Tensor data (the ``data/N`` entries of the zip) stays memory-mapped: the file
  is mapped once, copy-on-write, and each tensor is a view into that mapping (its size, strides and
  offset checked against the storage first), so a 5 GB checkpoint costs no more memory than the
  tensors touched.

``torch.load`` is not used, not even with ``weights_only=True``: the allowlist here is short enough to
audit, and it needs one extra rule for real Stable Diffusion 1.x files. Those were saved by PyTorch
Lightning and pickle Lightning's ``ModelCheckpoint`` class (and sometimes numpy scalars) in their
``callbacks`` metadata. The names in :data:`PLACEHOLDER_NAMES` become inert
:class:`~openldm.checkpoints.pickle_machine.Placeholder` types, made anew for every load, that only
record the pickled arguments and state; the metadata is then dropped, and a placeholder anywhere in the
returned state dict is an error.
"""

from __future__ import annotations

import math
import os
import stat
import struct
import sys
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from openldm.checkpoints.errors import (
    AdapterError,
    CheckpointError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    excerpt,
)
from openldm.checkpoints.pickle_machine import Globals, PickleMachine, PickleRejected, describe

StateDict = dict[str, torch.Tensor]

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a zip local file header, 30 bytes
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
MAX_PICKLE_BYTES = 256 * 1024 * 1024  # data.pkl: an SD checkpoint's is under 1 MB, with optimizer state tens
MAX_STORAGE_BYTES = 64 * 1024**3  # one deflated tensor entry, decompressed
MAX_DEFLATE_RATIO = 1032  # deflate cannot compress more than about 1032:1
MAX_DIMS = 16
_REDOWNLOAD = "Download it again (the transfer may have been cut short) or check that it is the right file"


def read_state_dict(path: str | os.PathLike[str]) -> StateDict:
    """The tensors of a ``.safetensors`` or PyTorch zip checkpoint, keyed by name.

    A checkpoint of the form ``{"state_dict": {...}, ...}`` (Lightning, the reference ``.ckpt``
    files) is unwrapped; its other entries (``global_step``, callbacks...) are dropped.
    """
    path = Path(path)
    kind = sniff(path)
    if kind == "safetensors":
        return read_safetensors(path)
    return _tensors_only(_unwrap(read_torch_zip(path)), path)


def regular_file(path: Path) -> int:
    """The size of ``path``, which must be a regular file (a FIFO or a device would hang or never end
    a read); a :class:`CorruptCheckpointError` otherwise."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise CorruptCheckpointError(path, "no such file", "Check the path") from None
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(path, f"cannot be read ({type(e).__name__})", "Check the path") from None
    if stat.S_ISDIR(info.st_mode):
        raise CorruptCheckpointError(
            path,
            "is a folder, not a checkpoint file",
            "Pass the file inside it, or a diffusers folder to load()",
        )
    if not stat.S_ISREG(info.st_mode):
        raise CorruptCheckpointError(path, "is not a regular file (a pipe or a device?)", "Pass a file")
    return info.st_size


DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def weights_file(path: Path, what: str, advice: str) -> Path:
    """``path`` itself, or for a diffusers component folder its weights file; a folder without one is
    an :class:`AdapterError` (``what``: "VAE weights"...)."""
    if not path.is_dir():
        return path
    for name in DIFFUSERS_WEIGHTS:
        if (path / name).is_file():
            return file_inside(path, name, what)
    raise AdapterError(path, "a folder without diffusion_pytorch_model.safetensors or .bin", advice)


def file_inside(folder: Path, name: Any, what: str) -> Path:
    """``folder / name`` for a file name read from the folder's own JSON: relative, inside ``folder``
    once every symlink is resolved, and a regular file. Its content never appears in an error."""
    if not isinstance(name, str) or not name or "\0" in name or len(name) > 4096:
        raise CorruptCheckpointError(
            folder, f"{what} names a file as {describe(name)}", "Download the folder again"
        )
    path = folder / name
    escapes = Path(name).is_absolute() or ".." in Path(name).parts
    try:
        target, root = path.resolve(strict=True), _root_of(folder.resolve(strict=True))
        inside = not escapes and target.is_relative_to(root)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        missing = f"{what} names {describe(name)}, which is missing"
        raise CorruptCheckpointError(folder, missing, _REDOWNLOAD) from None
    if not inside:
        raise UnsafeCheckpointError(
            folder,
            f"{what} names {describe(name)}, which lies outside the folder",
            "Use the folder as published; a file list that points elsewhere is not read",
        )
    regular_file(path)
    return path


def _root_of(folder: Path) -> Path:
    """Where a folder's files may resolve to: the folder itself, or for a snapshot in the Hugging Face
    cache (``models--org--name/snapshots/<revision>/...``, files linked to ``../../blobs/<hash>``) that
    repository's cache folder."""
    parts = folder.parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--"):
            return Path(*parts[:i])
    return folder


def sniff(path: Path) -> str:
    """``"safetensors"`` or ``"torch-zip"`` from the first bytes; a clear error for anything else."""
    size = regular_file(path)
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise CorruptCheckpointError(path, f"cannot be read ({e.strerror})", "Check the path") from None
    if size == 0:
        raise CorruptCheckpointError(path, "the file is empty (0 bytes)", _REDOWNLOAD)
    if head[:4] in _ZIP_MAGIC:
        return "torch-zip"
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 0 < header_len <= _MAX_SAFETENSORS_HEADER:
            if header_len > size - 8:
                raise CorruptCheckpointError(
                    path,
                    f"truncated safetensors file: its header alone claims {header_len} bytes, "
                    f"the file has {size}",
                    _REDOWNLOAD,
                )
            return "safetensors"
    if head.startswith(b"version https://git-lfs"):
        raise CorruptCheckpointError(
            path,
            "a Git LFS pointer, not the weights",
            "Fetch the real file (git lfs pull) or download it again",
        )
    if head[:1] == b"\x80" or head[257:262] == b"ustar":
        raise CorruptCheckpointError(
            path,
            "saved in PyTorch's legacy (pre-1.6, non-zip) serialization format, which is not read here",
            "Re-save it with a current PyTorch (torch.save in an environment you trust) "
            "or convert it to .safetensors",
        )
    raise CorruptCheckpointError(
        path,
        f"not a safetensors or PyTorch checkpoint (it looks like {_looks_like(head)})",
        "Check that the file is a model checkpoint and was downloaded completely",
    )


def _looks_like(head: bytes) -> str:
    """What the first bytes suggest, without quoting them (the file may be anything, even secret)."""
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html")):
        return "an HTML page: a download that returned an error page?"
    if text.startswith((b"{", b"[")):
        return "JSON text"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of an unknown kind"
    return "text"


def read_safetensors(path: str | os.PathLike[str]) -> StateDict:
    """All tensors of a ``.safetensors`` file, memory-mapped (nothing is read until used)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(os.fspath(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptCheckpointError(path, f"damaged or truncated safetensors file ({e})", _REDOWNLOAD) from e


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` strings of a ``.safetensors`` file ({} if it has none)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptCheckpointError(path, f"damaged or truncated safetensors file ({e})", _REDOWNLOAD) from e


def read_torch_zip(path: str | os.PathLike[str]) -> Any:
    """The whole object pickled in a PyTorch zip file, through :class:`~openldm.checkpoints.
    pickle_machine.PickleMachine` with this module's allowlist.

    Metadata may contain :class:`Placeholder` objects; :func:`read_state_dict` keeps only the tensors.
    """
    path = Path(path)
    records = _ZipRecords(path)
    try:
        data = records.read("data.pkl", MAX_PICKLE_BYTES)
        return PickleMachine(data, _globals(path), records.persistent_load).run()
    except CheckpointError:
        raise
    except (PickleRejected, ValueError, TypeError, OverflowError, RuntimeError, MemoryError) as e:
        # PickleRejected: the machine; the others: a rebuild function given arguments it refuses.
        raise CorruptCheckpointError(
            path, f"the pickle in the checkpoint is malformed ({e})", _REDOWNLOAD
        ) from None
    finally:
        records.close()


# --- the zip container -------------------------------------------------------------------------


class _ZipRecords:
    """The entries of a PyTorch zip archive (``<name>/data.pkl``, ``<name>/data/<key>``, ...).

    Only stored and deflated entries are read (``torch.save`` stores; other writers may deflate),
    never encrypted ones; an entry's declared size is checked against its cap before anything is
    read, and the read stops at that size.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size
        try:
            self.zip = zipfile.ZipFile(path)
            names = self.zip.namelist()
        except (
            zipfile.BadZipFile,
            OSError,
            EOFError,
            ValueError,
            UnicodeDecodeError,
            NotImplementedError,
        ) as e:
            raise CorruptCheckpointError(
                path, f"damaged or truncated zip archive ({e})", _REDOWNLOAD
            ) from None
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CorruptCheckpointError(
                path,
                "a zip archive, but not one written by torch.save (no single <name>/data.pkl)",
                _REDOWNLOAD,
            )
        self.prefix = pickles[0][: -len("data.pkl")]
        self.names = frozenset(names)
        self._mapping: torch.UntypedStorage | None = None
        self._storages: dict[str, torch.UntypedStorage] = {}
        self._file: BinaryIO | None = None
        self._check_byteorder()

    def close(self) -> None:
        self.zip.close()
        if self._file is not None:
            self._file.close()

    def _info(self, name: str) -> zipfile.ZipInfo:
        try:
            info = self.zip.getinfo(self.prefix + name)
        except KeyError:
            raise CorruptCheckpointError(
                self.path, f"the archive has no entry {name!r}", _REDOWNLOAD
            ) from None
        if info.flag_bits & 0x1:
            raise UnsafeCheckpointError(
                self.path,
                f"its entry {name!r} is encrypted",
                "Use the unencrypted checkpoint as torch.save writes it",
            )
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CorruptCheckpointError(
                self.path,
                f"its entry {name!r} is compressed with method {info.compress_type}; only stored and "
                "deflated entries are read",
                "Re-save it with torch.save, or convert it to .safetensors",
            )
        return info

    def read(self, name: str, limit: int) -> bytes:
        """The bytes of ``name``: at most ``limit``, as many as its header declares."""
        info = self._info(name)
        if info.file_size > limit:
            raise CorruptCheckpointError(
                self.path,
                f"its entry {name!r} declares {info.file_size} bytes, more than the {limit} a "
                "checkpoint needs",
                _REDOWNLOAD,
            )
        try:
            with self.zip.open(info) as entry:
                data = entry.read(info.file_size + 1)
        except (
            zipfile.BadZipFile,
            OSError,
            EOFError,
            ValueError,
            RuntimeError,
            NotImplementedError,
            zlib.error,
        ) as e:
            raise CorruptCheckpointError(
                self.path, f"cannot read entry {name!r} ({e})", _REDOWNLOAD
            ) from None
        if len(data) != info.file_size:
            raise CorruptCheckpointError(
                self.path,
                f"entry {name!r} holds {len(data)} bytes, its header says {info.file_size}",
                _REDOWNLOAD,
            )
        return data

    def storage(self, key: str) -> torch.UntypedStorage:
        """The bytes of ``data/<key>``: a view into the memory-mapped file, shared between tensors."""
        if key not in self._storages:
            self._storages[key] = self._load_storage(key)
        return self._storages[key]

    def _load_storage(self, key: str) -> torch.UntypedStorage:
        name = f"data/{key}"
        info = self._info(name)
        if info.compress_type != zipfile.ZIP_STORED:  # torch.save never compresses; other writers might
            return _untyped(self.read(name, min(self.size * MAX_DEFLATE_RATIO, MAX_STORAGE_BYTES)))
        start = self._data_offset(info)
        if start + info.file_size > self.size or info.compress_size != info.file_size:
            raise CorruptCheckpointError(
                self.path, f"tensor data {name!r} runs past the end of the file", _REDOWNLOAD
            )
        if start % 64:  # torch.save aligns data to 64 bytes; copy anything else rather than view it unaligned
            return _untyped(self.read(name, info.file_size))
        return self._mapped()[start : start + info.file_size]

    def persistent_load(self, pid: Any) -> _Storage:
        """A storage reference: ``("storage", storage type, key, location, numel)``, every part checked."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise PickleRejected(f"unsupported persistent id {describe(pid)}")
        _, storage_type, key, _location, numel = pid
        valid_key = isinstance(key, str) and 0 < len(key) <= 64 and "/" not in key and ".." not in key
        if not isinstance(storage_type, _StorageType) or not valid_key or type(numel) is not int or numel < 0:
            raise PickleRejected(f"malformed storage reference {describe(pid)}")
        data = self.storage(key)
        if data.nbytes() < numel * storage_type.dtype.itemsize:
            raise PickleRejected(
                f"storage {excerpt(key)} holds {data.nbytes()} bytes, {numel} elements were declared"
            )
        return _Storage(data, storage_type.dtype)

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        if self._file is None:  # one handle for every entry's local header
            self._file = open(self.path, "rb")  # noqa: SIM115 (closed with the records)
        self._file.seek(info.header_offset)
        raw = self._file.read(_LOCAL_HEADER.size)
        if len(raw) != _LOCAL_HEADER.size or raw[:4] != b"PK\x03\x04":
            raise CorruptCheckpointError(self.path, f"damaged zip entry {info.filename!r}", _REDOWNLOAD)
        fields = _LOCAL_HEADER.unpack(raw)
        name_len, extra_len = fields[-2], fields[-1]
        return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len

    def _mapped(self) -> torch.UntypedStorage:
        if self._mapping is None:  # private (copy-on-write) mapping: writes never reach the file
            self._mapping = torch.UntypedStorage.from_file(os.fspath(self.path), False, self.size)
        return self._mapping

    def _check_byteorder(self) -> None:
        if self.prefix + "byteorder" not in self.names:
            return  # written before PyTorch recorded it: native order, as torch.load assumes
        order = self.read("byteorder", 16).decode("ascii", "replace").strip()
        if order != sys.byteorder:
            raise CorruptCheckpointError(
                self.path,
                f"tensor data is stored {describe(order)}-endian, this machine is {sys.byteorder}-endian",
                "Convert it to .safetensors on a machine of the same byte order",
            )


def _untyped(data: bytes) -> torch.UntypedStorage:
    return (
        torch.frombuffer(bytearray(data), dtype=torch.uint8).untyped_storage()
        if data
        else torch.UntypedStorage(0)
    )


# --- what the pickle may name ------------------------------------------------------------------


@dataclass(frozen=True)
class _StorageType:
    """What ``torch.FloatStorage`` and friends resolve to: nothing but a dtype."""

    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    """A storage read from ``data/<key>``, typed as the pickle declared it."""

    data: torch.UntypedStorage
    dtype: torch.dtype


# Names replaced by inert placeholders. They only ever appear in training metadata.
PLACEHOLDER_NAMES: frozenset[str] = frozenset(
    {
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
        "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
        # numpy scalars in metadata (e.g. a monitored metric) and the bytes they are pickled with
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.dtype",
        "_codecs.encode",
    }
)


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > MAX_DIMS or not all(type(v) is int for v in value):
        raise ValueError(f"tensor {what} must be a short tuple of ints, got {describe(value)}")
    return value


def _tensor(storage: Any, offset: Any, size: Any, stride: Any) -> torch.Tensor:
    """A tensor viewing ``storage``; every argument is checked before anything is built: the view stays
    inside the storage and holds no more elements than the storage does (a stride-0 view cannot
    declare 2**62 elements to be copied later)."""
    if not isinstance(storage, _Storage):
        raise ValueError(f"a tensor must be built on a storage, got {type(storage).__name__}")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) > MAX_DIMS or type(offset) is not int or offset < 0 or len(size) != len(stride):
        raise ValueError(f"invalid tensor layout: offset {describe(offset)}, size {describe(size)}")
    if min(size + stride, default=0) < 0:
        raise ValueError(f"invalid tensor layout: size {describe(size)}, stride {describe(stride)}")
    available = storage.data.nbytes() // storage.dtype.itemsize
    numel = math.prod(size)
    extent = 0 if numel == 0 else offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
    if extent > available or numel > available:
        raise ValueError(
            f"a tensor of {numel} elements reaching element {extent} of a storage of {available}"
        )
    return torch.empty(0, dtype=storage.dtype).set_(storage.data, offset, size, stride)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> torch.Tensor:
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    # requires_grad and hooks are dropped: loaded weights are plain tensors.
    if metadata:
        raise ValueError(f"unsupported tensor metadata {describe(metadata)}")
    return _tensor(storage, offset, size, stride)


def _rebuild_parameter(
    data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None
) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"a parameter must wrap a tensor, got {type(data).__name__}")
    return data


def _size(dims: Any = ()) -> torch.Size:
    return torch.Size(_int_tuple(tuple(dims) if isinstance(dims, list) else dims, "size"))


_CALLABLES: dict[str, Callable[..., Any]] = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "collections.OrderedDict": OrderedDict,
    "torch.Size": _size,
}
_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
_GLOBALS: dict[str, Any] = {
    **_CALLABLES,
    **{f"torch.{name}": dtype for name, dtype in _DTYPES.items()},
    **{f"torch.{name}": _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}
ALLOWED_NAMES: frozenset[str] = frozenset(_GLOBALS) | PLACEHOLDER_NAMES


def _globals(path: Path) -> Globals:
    """The allowlist: tensor rebuilding, storages, dtypes, OrderedDict; metadata names as placeholders."""

    def refuse(qualified: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(
            path,
            f"refused to load: its pickle asks for {excerpt(qualified)}, which is not a tensor, storage or "
            "plain container (a checkpoint that names arbitrary code can run it when loaded with torch.load)",
            "Get a .safetensors version of the model, or, only if you trust where the file came from, "
            "convert it in an isolated environment",
        )

    return Globals(_GLOBALS, PLACEHOLDER_NAMES, refuse)


# --- from the unpickled object to a state dict -------------------------------------------------


def _unwrap(obj: Any) -> Any:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]
    return obj


def _tensors_only(obj: Any, path: Path) -> StateDict:
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(
            path, f"holds a {type(obj).__name__}, not a dict of tensors", "Pass a checkpoint of model weights"
        )
    out: StateDict = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CorruptCheckpointError(
                path,
                f"entry {excerpt(key)} of its state dict is a {type(value).__name__}, not a tensor",
                "Pass a checkpoint that holds only model weights",
            )
        out[key] = value.detach()  # a plain tensor: no requires_grad, no hooks, no subclass state
    return out
