"""UNet-only variant files: an inpainting or depth model stored as its UNet plus the name of its base.

A variant trained from a base model (the embedded model's inpainting and depth variants) shares the
base's VAE and text encoder bit for bit, so its file holds only ``model.diffusion_model.*`` tensors and,
in its safetensors metadata, a fingerprint of the base's other tensors. Loading merges the two back
into one complete single-file state dict, which then goes through the normal detection and loading.

A variant may also keep some of the base's UNet tensors as they are (its metadata names them by key
fragments, ``openldm.inherits``: "time_embed.,emb_layers."); those are left out of its file, taken from
the base when merging, and covered by the fingerprint.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from openldm.checkpoints.detect import UNET_PREFIX
from openldm.checkpoints.errors import CorruptCheckpointError, excerpt
from openldm.config import ModelSpec

BASE_KEY, FINGERPRINT_KEY, FILE_KEY = "openldm.base", "openldm.base_fingerprint", "openldm.base_file"
INHERITS_KEY = "openldm.inherits"


def is_inherited(key: str, inherited: tuple[str, ...]) -> bool:
    """Whether a UNet tensor's name (with or without the single-file prefix) contains one of the
    ``inherited`` fragments: a tensor a variant keeps from its base."""
    return any(fragment in key for fragment in inherited)


def inherited_fragments(metadata: Mapping[str, str]) -> tuple[str, ...]:
    """The key fragments a variant file's metadata says it takes from its base (none by default)."""
    return tuple(fragment for fragment in metadata.get(INHERITS_KEY, "").split(",") if fragment)


def spec_metadata(spec: ModelSpec) -> dict[str, str]:
    """The metadata ``openldm train`` writes into its files: what the weights alone do not tell (the
    loader reads it back: the scale factor, image size, prediction type and text attention heads)."""
    return {
        "openldm.preset": spec.name,
        "openldm.prediction_type": spec.prediction_type,
        "openldm.scale_factor": repr(spec.vae.scale_factor),
        "openldm.image_size": str(spec.image_size),
        "openldm.text_heads": str(spec.text.heads),
    }


def base_fingerprint(sd: Mapping[str, torch.Tensor], inherited: tuple[str, ...] = ()) -> str:
    """SHA-256 (16 hex digits) of a single file's tensors outside the UNet and of the ``inherited`` UNet
    tensors: names, dtypes, shapes, bytes."""
    digest = hashlib.sha256()
    for key in sorted(k for k in sd if not k.startswith(UNET_PREFIX) or is_inherited(k, inherited)):
        value = sd[key].detach().cpu().contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def file_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """A safetensors file's metadata ({} for none, and for files in other formats)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError):
        return {}


def is_variant_file(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict holds a UNet and nothing else."""
    return bool(sd) and all(k.startswith(UNET_PREFIX) for k in sd)


def merge_with_base(
    variant: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    base: Mapping[str, torch.Tensor],
    source: str | os.PathLike[str] = "variant",
) -> dict[str, torch.Tensor]:
    """The complete single file of a variant: the base's tensors with the variant's UNet instead of its own
    (and the base's UNet tensors the variant inherits).

    :class:`CorruptCheckpointError` when the variant holds more than a UNet, or names a base whose
    tensors differ.
    """
    if not is_variant_file(variant):
        stray = [k for k in variant if not k.startswith(UNET_PREFIX)]
        raise CorruptCheckpointError(
            source,
            f"a variant file holds only {UNET_PREFIX}* tensors; this one has {stray[:3] or 'none'}",
            "Pass a complete checkpoint without a base, or a UNet-only variant file with its base",
        )
    expected = metadata.get(FINGERPRINT_KEY)
    inherited = inherited_fragments(metadata)
    actual = base_fingerprint(base, inherited)
    if expected is not None and expected != actual:
        raise CorruptCheckpointError(
            source,
            f"it was trained on the base {excerpt(metadata.get(FILE_KEY, '?'))} (fingerprint {expected}) "
            f"but the given base differs (fingerprint {actual})",
            "Use the base it was trained on, or train the variant again on this one "
            "(openldm train --stage inpaint|depth --base FILE)",
        )
    merged = {k: v for k, v in base.items() if not k.startswith(UNET_PREFIX) or is_inherited(k, inherited)}
    merged.update(variant)
    return merged


def read_variant(path: str | os.PathLike[str], base_path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """:func:`merge_with_base` of two files."""
    from openldm.checkpoints.read import read_state_dict

    return merge_with_base(read_state_dict(path), file_metadata(path), read_state_dict(base_path), path)


def default_base(metadata: Mapping[str, str]) -> Path | None:
    """The packaged embedded model when a variant's metadata names it as its base, else None."""
    if metadata.get(BASE_KEY) != "embedded":
        return None
    from openldm.checkpoints.packaged import EMBEDDED_FILE

    return EMBEDDED_FILE if EMBEDDED_FILE.is_file() else None
