"""LoRA and LyCORIS files: read, every key mapped to a layer of the model, checked before any use.

A file is a flat dictionary ``<layer name>.<part>`` -> tensor (see :mod:`openldm.adapters.names` for
the layer names, :data:`PARTS` for the parts). Every key must map to a layer of this model, every layer's
parts must form one known kind, and every change must fit its layer: otherwise an
:class:`~openldm.checkpoints.errors.AdapterError` names the key and the file (nothing is skipped).
``alpha`` comes from the file's ``.alpha`` keys, else from diffusers' ``lora_adapter_metadata``
(PEFT's ``lora_alpha``, ``alpha_pattern``), else it is the rank (scale 1).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from openldm.adapters.deltas import Kind, LayerChange, weight_change
from openldm.adapters.names import Layer, Network, normalise
from openldm.checkpoints.errors import AdapterError, CheckpointError, excerpt
from openldm.checkpoints.read import read_safetensors_metadata, read_state_dict, sniff
from openldm.files import file_hash

# Part of a key after its layer name -> the part's name here.
PARTS: dict[str, str] = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down",
    "lora_linear_layer.up.weight": "up",
    "down.weight": "down",  # diffusers' attention processors: ...processor.to_q_lora.down.weight
    "up.weight": "up",
    "alpha": "alpha",
    **{name: name for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    **{name: name for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")},
    **{name: name for name in ("lokr_t2", "diff", "diff_b", "w_norm", "b_norm")},
}
_SUFFIXES = sorted(PARTS, key=len, reverse=True)
_UNSUPPORTED = {
    "dora_scale": "DoRA (weight-decomposed LoRA)",
    "lora_magnitude_vector": "DoRA (weight-decomposed LoRA)",
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
    "a1.weight": "GLoRA",
}
_KIND_NEEDS: dict[Kind, tuple[tuple[str, ...], ...]] = {
    "lora": (("up",), ("down",)),
    "loha": (("hada_w1_a",), ("hada_w1_b",), ("hada_w2_a",), ("hada_w2_b",)),
    "lokr": (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")),
    "full": (("diff",),),
    "norm": (("w_norm",),),
}
_SDXL_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.")
CONTEXT_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
_CONTEXT_KEY = re.compile(r"attn2[._]to_k")
_TEXT_KEY = re.compile(r"self_attn[._]q_proj")
_SD_FILE = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class LoraFile:
    """A LoRA or LyCORIS file read and fitted to a model: its changes by layer."""

    name: str  # the file's stem: ``<lora:name:1>`` in prompts
    path: Path
    changes: dict[Layer, LayerChange] = field(repr=False)

    @functools.cached_property
    def short_hash(self) -> str:
        """The web UI's ``Lora hashes`` value: sha256 of the tensors' bytes (after the safetensors
        header), or of the whole file otherwise; the first 12 hex digits."""
        return file_hash(self.path, skip_header=self.path.suffix == ".safetensors")[:12]

    def networks(self) -> set[Network]:
        return {layer.network for layer in self.changes}


def _split(key: str) -> tuple[str, str] | None:
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], PARTS[suffix]
    return None


def _context_width(sd: Mapping[str, torch.Tensor]) -> int | None:
    """The text width the file was made for: its cross-attention keys' inputs, else its text encoder's."""
    for pattern in (_CONTEXT_KEY, _TEXT_KEY):
        for key, value in sd.items():
            split = _split(key)
            if split and split[1] == "down" and pattern.search(split[0]) and value.ndim == 2:
                return int(value.shape[1])
    return None


def family_of(width: int | None) -> str:
    if width is None:
        return "another model"
    return CONTEXT_FAMILIES.get(width, f"a model with {width}-wide text conditioning")


def _fail(path: Path, problem: str, advice: str) -> AdapterError:
    return AdapterError(path, problem, advice)


def _peft_alpha(metadata: Mapping[str, str], network: Network, path: str) -> float | None:
    """PEFT's alpha for a layer from diffusers' ``lora_adapter_metadata`` (None if absent)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        return None
    patterns = config.get(f"{network}.alpha_pattern") or {}
    short = path.removeprefix("text_model.")
    for pattern, alpha in patterns.items() if isinstance(patterns, dict) else ():
        if re.match(rf"(.*\.)?({pattern})$", short) or re.match(rf"(.*\.)?({pattern})$", path):
            return float(alpha)
    alpha = config.get(f"{network}.lora_alpha")
    return float(alpha) if isinstance(alpha, int | float) else None


def _kind(path: Path, name: str, parts: Mapping[str, torch.Tensor]) -> Kind:
    names = set(parts)
    if "diff" in names:
        kind: Kind = "full"
    elif "w_norm" in names:
        kind = "norm"
    elif any(n.startswith("hada_") for n in names):
        kind = "loha"
    elif any(n.startswith("lokr_") for n in names):
        kind = "lokr"
    else:
        kind = "lora"
    for options in _KIND_NEEDS[kind]:
        if not names & set(options):
            raise _fail(
                path,
                f"layer {excerpt(name)} has {sorted(names)} but a {kind} change needs {' or '.join(options)}",
                "The file is incomplete or damaged; download it again",
            )
    return kind


def _group(path: Path, sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer name: {part: tensor}}``; an error for a key that is no known part."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        for marker, method in _UNSUPPORTED.items():
            if key.endswith(marker) or f".{marker}." in key:
                raise _fail(
                    path,
                    f"key {excerpt(key)} belongs to {method}, which openldm does not apply",
                    "Use a LoRA, LoCon, LoHa, LoKr or full/norm-diff file",
                )
        split = _split(key)
        if split is None:
            raise _fail(
                path,
                f"key {excerpt(key)} is no part of a LoRA or LyCORIS layer openldm knows "
                "(lora_down/lora_up/alpha, lora_A/lora_B, hada_*, lokr_*, diff, w_norm)",
                "Check that this is a LoRA or LyCORIS file",
            )
        name, part = split
        groups.setdefault(normalise(name), {})[part] = value
    return groups


def _check_fits(path: Path, name: str, change: LayerChange, weight: torch.Tensor, width: int | None) -> None:
    meta = LayerChange(change.kind, {k: v.to("meta") for k, v in change.parts.items()}, change.alpha)
    try:
        weight_change(meta, weight.shape)
    except (ValueError, RuntimeError) as e:
        raise _fail(
            path,
            f"layer {excerpt(name)} does not fit this model ({e}): the file was made for {family_of(width)}",
            "Use a LoRA made for this model's family",
        ) from None


def read_lora(
    path: str | os.PathLike[str],
    layers: Mapping[str, Layer],
    weights: Mapping[Layer, torch.Tensor],
    model_width: int,
    model_family: str,
) -> LoraFile:
    """Read the LoRA / LyCORIS file at ``path`` for a model whose layers are ``layers`` (every spelling
    -> layer, :func:`openldm.adapters.names.layer_table`) with the weights ``weights``."""
    path = Path(path)
    try:
        kind = sniff(path)
        sd = read_state_dict(path)
        metadata = read_safetensors_metadata(path) if kind == "safetensors" else {}
    except AdapterError:
        raise
    except CheckpointError as e:
        raise _fail(path, e.problem, e.advice) from None
    if not sd:
        raise _fail(path, "the file holds no tensors", "Check that this is a LoRA file")
    if any(key.startswith(_SDXL_PREFIXES) for key in sd):
        raise _fail(
            path, "made for SDXL (two text encoders)", "openldm runs SD 1.x and 2.x: use a LoRA for those"
        )
    width = _context_width(sd)
    mismatch = width is not None and width != model_width
    changes: dict[Layer, LayerChange] = {}
    for name, parts in _group(path, sd).items():
        layer = layers.get(name)
        if layer is None or mismatch:
            made_for = f"; the file was made for {family_of(width)}" if width is not None else ""
            raise _fail(
                path,
                f"key {excerpt(name)} names no layer of this {model_family} model{made_for}",
                "Use a LoRA made for this model's family"
                if made_for
                else "Check that the LoRA fits this model",
            )
        alpha_tensor = parts.pop("alpha", None)
        alpha = (
            float(alpha_tensor)
            if alpha_tensor is not None
            else _peft_alpha(metadata, layer.network, layer.path)
        )
        if alpha is not None and not math.isfinite(alpha):
            raise _fail(path, f"layer {excerpt(name)} has alpha {alpha}", "The file is damaged")
        if not all(bool(torch.isfinite(t).all()) for t in parts.values()):
            raise _fail(path, f"layer {excerpt(name)} holds NaN or infinite values", "The file is damaged")
        change = LayerChange(_kind(path, name, parts), parts, alpha)
        _check_fits(path, name, change, weights[layer], width)
        changes[layer] = change
    return LoraFile(path.stem, path, changes)


def is_lora_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in _SD_FILE


def find_lora(name: str, folders: list[Path]) -> Path:
    """The file ``name`` (without suffix) in ``folders`` (searched in order, subfolders too)."""
    if not name or name != Path(name).name or name in (".", ".."):
        raise ValueError(f"LoRA name {name!r} must be a plain file name (no folders)")
    for folder in folders:
        for candidate in sorted(folder.rglob("*")):
            if candidate.stem == name and is_lora_file(candidate):
                return candidate
    where = ", ".join(str(f) for f in folders) or "no --lora-dir given"
    raise FileNotFoundError(f"no LoRA named {name!r} in {where}")
