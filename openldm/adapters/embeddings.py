"""Textual inversion embeddings: new words whose token vectors come from a file.

Three layouts are read, all through :mod:`openldm.checkpoints.read` (``.pt`` / ``.bin`` by the same
restricted unpickler as ``.ckpt`` files):

* the web UI's ``.pt``: ``{"string_to_param": {"*": Tensor[n, width]}, "name": ..., ...}``;
* the web UI's ``.safetensors``: ``{"emb_params": Tensor[n, width]}``;
* diffusers' ``learned_embeds``: ``{token: Tensor[width] or Tensor[n, width]}`` (one entry).

The word is the file's name (the web UI's convention) unless one is given; a prompt uses it as a word
(``a photo of my-style``, ``(my-style:1.2)``), and its ``n`` vectors take the place of its tokens.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from openldm.adapters.lora_files import family_of
from openldm.checkpoints.errors import AdapterError, CheckpointError, excerpt
from openldm.checkpoints.read import read_safetensors, read_torch_zip, sniff
from openldm.files import file_hash
from openldm.nn.clip import CLIPTextEncoder
from openldm.tokenizer import CLIPTokenizer

MAX_VECTORS = 75  # one CLIP window
SUFFIXES = (".pt", ".safetensors", ".bin")
_WORD = re.compile(r"[^\s()\[\]:<>\\]+")
_SDXL_KEYS = frozenset({"clip_l", "clip_g"})


@dataclass(frozen=True)
class Embedding:
    """A textual inversion embedding: its word, file and ``[n, width]`` vectors."""

    word: str
    path: Path
    vectors: torch.Tensor = field(repr=False)

    @functools.cached_property
    def short_hash(self) -> str:
        """The web UI's ``TI hashes`` value: sha256 of the file, first 12 hex digits."""
        return file_hash(self.path, skip_header=False)[:12]


def _fail(
    path: Path, problem: str, advice: str = "Check that this is a textual inversion embedding"
) -> AdapterError:
    return AdapterError(path, problem, advice)


def _vectors_of(path: Path, obj: Any) -> torch.Tensor:
    if not isinstance(obj, dict):
        raise _fail(path, f"holds a {type(obj).__name__}, not a dictionary of tensors")
    if _SDXL_KEYS & set(obj):
        raise _fail(path, "made for SDXL (clip_l and clip_g vectors)", "openldm runs SD 1.x and 2.x")
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise _fail(path, "its string_to_param is not a dictionary of one tensor")
        obj = params
    elif "emb_params" in obj:
        obj = {"emb_params": obj["emb_params"]}
    tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
    if len(obj) != 1 or len(tensors) != 1:
        names = ", ".join(excerpt(k) for k in list(obj)[:5])
        raise _fail(path, f"expected one tensor of vectors, found entries {names}")
    return tensors[0]


def embedding_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The embedding files of ``folder`` (not its subfolders), by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix in SUFFIXES)


def vectors_shape(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(vectors, width) of the embedding in ``path``, for a listing (no model needed)."""
    path = Path(path)
    try:
        obj = read_safetensors(path) if sniff(path) == "safetensors" else read_torch_zip(path)
    except CheckpointError as e:
        raise _fail(path, e.problem, e.advice) from None
    vectors = _vectors_of(path, obj)
    return (1, vectors.shape[0]) if vectors.ndim == 1 else (int(vectors.shape[0]), int(vectors.shape[-1]))


def read_embedding(path: str | os.PathLike[str], width: int, word: str | None = None) -> Embedding:
    """The embedding in ``path`` for a text encoder of ``width``; its word is ``word`` or the file's name."""
    path = Path(path)
    try:
        obj = read_safetensors(path) if sniff(path) == "safetensors" else read_torch_zip(path)
    except AdapterError:
        raise
    except CheckpointError as e:
        raise _fail(path, e.problem, e.advice) from None
    vectors = _vectors_of(path, obj).detach()
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or not vectors.is_floating_point():
        raise _fail(
            path, f"its vectors have shape {list(vectors.shape)} and type {vectors.dtype}, not [n, width]"
        )
    if vectors.shape[1] != width:
        raise _fail(
            path,
            f"its vectors are {vectors.shape[1]} wide (made for {family_of(vectors.shape[1])}), "
            f"this model's text encoder is {width} wide",
            "Use an embedding made for this model's family",
        )
    if not 1 <= vectors.shape[0] <= MAX_VECTORS:
        raise _fail(path, f"it has {vectors.shape[0]} vectors; between 1 and {MAX_VECTORS} fit a prompt")
    if not bool(torch.isfinite(vectors).all()):
        raise _fail(path, "its vectors hold NaN or infinite values", "The file is damaged")
    word = path.stem if word is None else word
    if not _WORD.fullmatch(word):
        raise ValueError(f"embedding word {word!r} must be one word without spaces, brackets, colons or <>")
    return Embedding(word.lower(), path, vectors.float().clone())


def install(tokenizer: CLIPTokenizer, text_encoder: CLIPTextEncoder, embeddings: list[Embedding]) -> None:
    """Make ``embeddings`` (and no others) the added words of ``tokenizer`` and ``text_encoder``."""
    vocab = text_encoder.config.vocab_size
    words: dict[str, list[int]] = {}
    for embedding in embeddings:
        start = vocab + sum(len(ids) for ids in words.values())
        words[embedding.word] = list(range(start, start + embedding.vectors.shape[0]))
    table = torch.cat([e.vectors for e in embeddings]) if embeddings else None
    text_encoder.set_added_tokens(table)
    tokenizer.set_added_words(words)


def words_in(prompts: list[str], embeddings: list[Embedding]) -> list[Embedding]:
    """The embeddings whose word appears in any of ``prompts`` (for the images' parameters)."""
    text = " ".join(prompts).lower()
    return [e for e in embeddings if re.search(rf"(?<![\w-]){re.escape(e.word)}(?![\w-])", text)]
