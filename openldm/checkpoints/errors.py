"""Errors raised while reading and loading checkpoints.

Every message names the file (or folder, or hub id) and says what to do about the problem.
"""

from __future__ import annotations

import os
import reprlib

_EXCERPT = reprlib.Repr()
_EXCERPT.maxlevel, _EXCERPT.maxstring, _EXCERPT.maxother = 2, 60, 60
_EXCERPT.maxlist = _EXCERPT.maxtuple = _EXCERPT.maxdict = 4


def excerpt(value: object) -> str:
    """A bounded repr of a value read from a file, for error messages (a file may hold megabytes)."""
    try:
        return _EXCERPT.repr(value)
    except Exception:  # a repr that fails is still named by its type
        return f"<{type(value).__name__}>"


class CheckpointError(Exception):
    """A checkpoint could not be read or loaded."""

    def __init__(self, path: str | os.PathLike[str], problem: str, advice: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        self.advice = advice
        super().__init__(f"{self.path}: {problem}. {advice}")

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return type(self), (self.path, self.problem, self.advice)


class UnsafeCheckpointError(CheckpointError):
    """The pickle in a ``.ckpt`` asks for something other than tensors and plain containers."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated, empty, not a checkpoint at all, or in an unsupported container."""


class UnknownArchitectureError(CheckpointError):
    """The weights do not match any model this package knows how to build."""


class MissingWeightsError(CheckpointError):
    """The weights are not on disk and cannot be downloaded (offline, or no ``huggingface_hub``)."""


class HubUnavailableError(MissingWeightsError):
    """A hub id that could not be fetched (offline, unknown repository, no ``huggingface_hub``).

    ``reason`` says why in a few words; ``FOLDER_PARTS`` names what a local copy needs."""

    FOLDER_PARTS = "model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/"

    def __init__(self, repo_id: str, reason: str) -> None:
        self.reason = reason
        super().__init__(
            repo_id,
            f"not a local file or folder, and it cannot be fetched from the Hugging Face hub ({reason})",
            f"Download its diffusers folder ({self.FOLDER_PARTS}) and load that folder's path",
        )

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # type: ignore[override]
        return type(self), (self.path, self.reason)


class AdapterError(CheckpointError):
    """A LoRA, LyCORIS, embedding or VAE file that cannot be read or does not fit the model."""
