"""Which Stable Diffusion variant a checkpoint holds: every format rule lives in this module.

Detection reads :class:`Features` (key names and tensor shapes of an original single file, or the
``config.json`` files of a diffusers folder) and matches them against :data:`SIGNATURES`, a table
whose rows exclude each other: exactly one row matches a known checkpoint, none matches anything
else, and then :class:`UnknownArchitectureError` names the file and what was found. There is no
fallback variant and nothing is guessed from weight values.

Original single-file layout (the reference ``ldm`` checkpoints):

====================================  ==========================================================
``model.diffusion_model.``            the UNet; ``input_blocks.0.0.weight`` gives in-channels
                                      (4 text-to-image/unCLIP, 5 depth, 7 x4 upscaler, 9 inpaint);
                                      ``label_emb.weight`` is the x4 upscaler's noise-level table,
                                      ``label_emb.0.0.weight`` unCLIP's image-embedding projection;
                                      an ``attn2.to_k`` weight gives the context width
``first_stage_model.``                the VAE
``cond_stage_model.transformer.``     SD 1 text encoder (CLIP ViT-L/14, transformers layout)
``cond_stage_model.model.``           SD 2 text encoder (OpenCLIP ViT-H/14)
``depth_model.``                      the depth model's MiDaS estimator
``low_scale_model.``                  the x4 upscaler's low-resolution noise schedule
``embedder.`` / ``noise_augmentor.``  unCLIP's image encoder and embedding noise augmentor
====================================  ==========================================================
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from openldm.checkpoints.errors import CorruptCheckpointError, UnknownArchitectureError
from openldm.checkpoints.read import regular_file
from openldm.config import Variant

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES: dict[str, str] = {
    "transformers": "cond_stage_model.transformer.",  # SD 1
    "open_clip": "cond_stage_model.model.",  # SD 2
}
# Components the reference stores next to the three networks, by name (the key prefix minus its dot).
EXTRA_COMPONENTS: tuple[str, ...] = ("depth_model", "low_scale_model", "embedder", "noise_augmentor")

ClassEmbedding = Literal["none", "table", "sequential", "other"]
TextFamily = Literal["clip-l", "openclip"]
_FAMILY_OF_LAYOUT: dict[str, TextFamily] = {"transformers": "clip-l", "open_clip": "openclip"}
_FAMILY_OF_CONTEXT: dict[int, TextFamily] = {768: "clip-l", 1024: "openclip"}
_FAMILY_OF_ACTIVATION: dict[str, TextFamily] = {"quick_gelu": "clip-l", "gelu": "openclip"}
_ATTN2_TO_K = re.compile(r".*\.attn2\.to_k\.weight")


@dataclass(frozen=True)
class Features:
    """What detection looks at."""

    in_channels: int
    class_embedding: ClassEmbedding
    # CLIP ViT-L (SD 1) or OpenCLIP ViT-H (SD 2); read from the text encoder's layout or config,
    # or from the context width (768 / 1024) when the checkpoint has no text encoder.
    text_family: TextFamily | None
    context_dim: int | None
    # Single files: the extra components present. Diffusers folders: empty (pipelines say it).
    components: frozenset[str] = frozenset()
    # Diffusers folders: the pipeline class named in model_index.json.
    pipeline: str | None = None

    def summary(self) -> str:
        parts = [
            f"UNet in_channels={self.in_channels}",
            f"class embedding={self.class_embedding}",
            f"text encoder={self.text_family or 'none'}",
            f"context width={self.context_dim}",
        ]
        if self.components:
            parts.append(f"extra components={sorted(self.components)}")
        if self.pipeline:
            parts.append(f"pipeline={self.pipeline}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Signature:
    """One row of the detection table."""

    variant: Variant
    in_channels: int
    class_embedding: ClassEmbedding
    text_families: frozenset[str]
    allowed_components: frozenset[str]
    pipelines: frozenset[str]

    def matches(self, f: Features) -> bool:
        return (
            f.in_channels == self.in_channels
            and f.class_embedding == self.class_embedding
            and f.text_family in self.text_families
            and f.components <= self.allowed_components
            and (f.pipeline is None or f.pipeline in self.pipelines)
        )


_TEXT_TO_IMAGE = frozenset({"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"})
_CLIP_L, _OPENCLIP, _ANY_TEXT = (
    frozenset({"clip-l"}),
    frozenset({"openclip"}),
    frozenset({"clip-l", "openclip"}),
)

SIGNATURES: tuple[Signature, ...] = (
    Signature("sd1", 4, "none", _CLIP_L, frozenset(), _TEXT_TO_IMAGE),
    Signature("sd2", 4, "none", _OPENCLIP, frozenset(), _TEXT_TO_IMAGE),
    Signature(
        "inpaint",
        9,
        "none",
        _ANY_TEXT,
        frozenset(),
        frozenset({"StableDiffusionInpaintPipeline", "StableDiffusionPipeline"}),
    ),
    Signature(
        "depth",
        5,
        "none",
        _ANY_TEXT,
        frozenset({"depth_model"}),
        frozenset({"StableDiffusionDepth2ImgPipeline"}),
    ),
    Signature(
        "x4-upscaler",
        7,
        "table",
        _OPENCLIP,
        frozenset({"low_scale_model"}),
        frozenset({"StableDiffusionUpscalePipeline"}),
    ),
    Signature(
        "unclip",
        4,
        "sequential",
        _OPENCLIP,
        frozenset({"embedder", "noise_augmentor"}),
        frozenset({"StableUnCLIPImg2ImgPipeline", "StableUnCLIPPipeline"}),
    ),
)


@dataclass(frozen=True)
class Detection:
    variant: Variant
    features: Features
    # "transformers" or "open_clip" for single files; None for diffusers folders.
    text_layout: str | None = None


def match(features: Features, source: str | os.PathLike[str]) -> Variant:
    """The variant of the one signature that matches; :class:`UnknownArchitectureError` otherwise."""
    found = [s.variant for s in SIGNATURES if s.matches(features)]
    if len(found) == 1:
        return found[0]
    if found:  # the table is meant to make this impossible; tests check it
        raise UnknownArchitectureError(
            source, f"ambiguous checkpoint: {features.summary()} matches {found}", "Report this as a bug"
        )
    raise UnknownArchitectureError(
        source,
        f"no known Stable Diffusion variant has {features.summary()}",
        "Known variants: " + "; ".join(_describe(s) for s in SIGNATURES) + ". Check that this is a Stable "
        "Diffusion checkpoint of one of these kinds",
    )


def _describe(s: Signature) -> str:
    text = "/".join(sorted(s.text_families))
    return f"{s.variant} (in_channels {s.in_channels}, class embedding {s.class_embedding}, {text})"


# --- single files ------------------------------------------------------------------------------


def detect_single_file(sd: Mapping[str, torch.Tensor], source: str | os.PathLike[str]) -> Detection:
    """The variant of an original-layout state dict, from key names and shapes only."""
    conv_in = sd.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None or conv_in.ndim != 4:
        raise UnknownArchitectureError(
            source,
            f"no Stable Diffusion UNet in it (no {UNET_PREFIX}input_blocks.0.0.weight); it holds "
            f"{len(sd)} tensors under {_prefix_summary(sd)}",
            "Pass a Stable Diffusion checkpoint in the original single-file layout, or a diffusers folder",
        )
    layouts = [name for name, prefix in TEXT_PREFIXES.items() if any(k.startswith(prefix) for k in sd)]
    if len(layouts) > 1:
        raise UnknownArchitectureError(
            source,
            "it holds both an SD 1 text encoder (cond_stage_model.transformer.*) and an SD 2 one "
            "(cond_stage_model.model.*)",
            "Remove the one that does not belong to this model",
        )
    layout = layouts[0] if layouts else None
    context = _context_dim(sd)
    family = _FAMILY_OF_LAYOUT[layout] if layout else _FAMILY_OF_CONTEXT.get(context or -1)
    features = Features(
        in_channels=int(conv_in.shape[1]),
        class_embedding=_class_embedding(sd),
        text_family=family,
        context_dim=context,
        components=frozenset(c for c in EXTRA_COMPONENTS if any(k.startswith(c + ".") for k in sd)),
    )
    return Detection(match(features, source), features, layout)


def _class_embedding(sd: Mapping[str, Any]) -> ClassEmbedding:
    if UNET_PREFIX + "label_emb.0.0.weight" in sd:
        return "sequential"
    if UNET_PREFIX + "label_emb.weight" in sd:
        return "table"
    return "none"


def _context_dim(sd: Mapping[str, torch.Tensor]) -> int | None:
    for key, value in sd.items():
        if key.startswith(UNET_PREFIX) and _ATTN2_TO_K.fullmatch(key) and value.ndim == 2:
            return int(value.shape[1])
    return None


def _prefix_summary(sd: Mapping[str, Any], limit: int = 6) -> str:
    counts = Counter(k.split(".", 1)[0] + ("." if "." in k else "") for k in sd)
    shown = [f"{p}* ({n})" for p, n in counts.most_common(limit)]
    more = f" and {len(counts) - limit} more" if len(counts) > limit else ""
    return (", ".join(shown) + more) if shown else "nothing"


# --- diffusers folders -------------------------------------------------------------------------


MAX_JSON_BYTES = 16 * 1024 * 1024  # a shard index of the largest models is a few hundred KB


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path`` (a regular file of at most :data:`MAX_JSON_BYTES`); a clear error
    when it is missing, too large, malformed or nested too deep, never quoting its content."""
    if not path.exists():
        raise CorruptCheckpointError(
            path, f"missing: a diffusers folder needs {what}", "Download the complete folder"
        )
    if regular_file(path) > MAX_JSON_BYTES:
        raise CorruptCheckpointError(
            path, f"{what} is larger than {MAX_JSON_BYTES} bytes", "Download the file again"
        )
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError) as e:
        problem = "nested too deep" if isinstance(e, RecursionError) else type(e).__name__
        raise CorruptCheckpointError(
            path, f"malformed {what} ({problem})", "Download the file again"
        ) from None
    if not isinstance(data, dict):
        raise CorruptCheckpointError(path, f"{what} is not a JSON object", "Download the file again")
    return data


def diffusers_features(
    model_index: Mapping[str, Any], unet: Mapping[str, Any], text_encoder: Mapping[str, Any] | None
) -> Features:
    """Features of a diffusers folder from its ``model_index.json`` and config files."""
    embed_type, classes = unet.get("class_embed_type"), unet.get("num_class_embeds")
    class_embedding: ClassEmbedding = "other"  # a diffusers class embedding the reference has no form of
    if embed_type == "projection":
        class_embedding = "sequential"
    elif embed_type is None:
        class_embedding = "none" if classes is None else "table"
    context = unet.get("cross_attention_dim")
    context = int(context) if isinstance(context, int) else None
    if text_encoder is not None:
        family = _FAMILY_OF_ACTIVATION.get(str(text_encoder.get("hidden_act", "quick_gelu")))
    else:
        family = _FAMILY_OF_CONTEXT.get(context or -1)
    return Features(
        in_channels=int(unet.get("in_channels", 4)),
        class_embedding=class_embedding,
        text_family=family,
        context_dim=context,
        pipeline=str(model_index.get("_class_name")),
    )


def detect_diffusers(folder: str | os.PathLike[str]) -> Detection:
    """The variant of a diffusers folder, from ``model_index.json`` and the unet/text encoder configs."""
    folder = Path(folder)
    index = read_json(folder / "model_index.json", "model_index.json")
    unet = read_json(folder / "unet" / "config.json", "unet/config.json")
    text_path = folder / "text_encoder" / "config.json"
    text = read_json(text_path, "text_encoder/config.json") if text_path.exists() else None
    try:
        features = diffusers_features(index, unet, text)
    except (TypeError, ValueError) as e:  # a config value of the wrong JSON type
        raise CorruptCheckpointError(
            folder, f"a config holds a value of the wrong type ({e})", "Download it again"
        ) from None
    return Detection(match(features, folder), features)


# --- extra networks ----------------------------------------------------------------------------

ExtraLayout = Literal["midas", "dpt-transformers", "open_clip", "clip-transformers"]
# Where a checkpoint keeps an extra network, by component name (single-file prefix or diffusers folder).
EXTRA_NETWORKS: dict[str, tuple[str, ExtraLayout]] = {
    "depth_model": ("depth_estimator", "midas"),  # the depth model's MiDaS DPT-hybrid
    "depth_estimator": ("depth_estimator", "dpt-transformers"),  # diffusers: transformers' DPT
    "embedder": ("image_encoder", "open_clip"),  # unCLIP's CLIP image tower
    "image_encoder": ("image_encoder", "clip-transformers"),  # diffusers: CLIPVisionModelWithProjection
}
# The CLIP image towers of unCLIP, told apart by width when no config.json says more: (activation, name).
IMAGE_ENCODER_WIDTHS: dict[int, tuple[str, str]] = {
    1280: ("gelu", "OpenCLIP ViT-H/14"),
    1024: ("quick_gelu", "OpenAI ViT-L/14"),
}


@dataclass(frozen=True)
class ExtraNetwork:
    """An extra network a checkpoint carries: which (``depth_estimator`` or ``image_encoder``), the
    component holding its weights, and their layout."""

    name: str
    component: str
    layout: ExtraLayout


def detect_extra_networks(components: Mapping[str, Any]) -> dict[str, ExtraNetwork]:
    """The extra networks among a loaded checkpoint's ``components`` (its extras), by name."""
    found: dict[str, ExtraNetwork] = {}
    for component, (name, layout) in EXTRA_NETWORKS.items():
        if component in components and name not in found:
            found[name] = ExtraNetwork(name, component, layout)
    return found


def image_encoder_activation(width: int, source: str | os.PathLike[str]) -> str:
    """The activation of a CLIP image tower of ``width`` (a folder without image_encoder/config.json)."""
    if width not in IMAGE_ENCODER_WIDTHS:
        known = ", ".join(f"{name} ({w} wide)" for w, (_, name) in IMAGE_ENCODER_WIDTHS.items())
        raise CorruptCheckpointError(
            source,
            f"image_encoder/config.json is missing and a {width}-wide image tower is none of {known}",
            "Download the image_encoder folder's config.json",
        )
    return IMAGE_ENCODER_WIDTHS[width][0]
