"""``load``: one entry point for original single files, diffusers folders and hub ids.

The networks are built on the meta device and receive the checkpoint's own tensors with
``load_state_dict(sd, assign=True, strict=True)``: nothing is randomly initialised, nothing is
copied (tensors of a safetensors file stay memory-mapped until moved to another device or cast),
and a missing, unexpected or misshapen tensor is an error that names it.

How each setting is decided, first source that has it wins:

* variant: :mod:`openldm.checkpoints.detect` (never a default).
* sizes: ``preset=`` if given; else read from the weights (``formats.*.infer_*``) and overridden by
  the reference yaml (``config=``: ``unet_config.params``, ``first_stage_config.params``); or, for
  a diffusers folder, its ``config.json`` files.
* prediction type: ``prediction_type=``; the yaml's ``parameterization`` ("v" -> v, absent -> eps);
  the preset; the diffusers ``scheduler/scheduler_config.json``; else a default, logged with how to
  override it: v for the x4 upscaler and unCLIP (their released weights are v models), eps for the
  rest (a warning for SD 2, whose 768 models are v models and 512 models are eps models).
* VAE scale factor: the yaml's ``scale_factor``; the diffusers vae ``scaling_factor``; else 0.18215
  (0.08333 for the x4 upscaler).
* noise schedule: the yaml's ``linear_start``/``linear_end``/``timesteps``; the diffusers scheduler's
  ``beta_start``/``beta_end``/``num_train_timesteps``; else the reference's (x4: 1e-4..0.02).

Dropped by name from single files (and nothing else): the reference's noise-schedule buffers
(:data:`SCHEDULE_BUFFERS`), ``model_ema.*`` (logged: released files already hold the EMA weights in
the main keys), ``first_stage_model.loss.*`` (the VAE's training loss) and the text encoder's
``position_ids``. The depth estimator, the x4 low-res schedule and unCLIP's image embedder and noise
augmentor are returned untouched in :attr:`Networks.extras`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import nn

from openldm.checkpoints import variant_files
from openldm.checkpoints.build import build_network, examples
from openldm.checkpoints.components import component_weights, weight_candidates
from openldm.checkpoints.detect import (
    EXTRA_COMPONENTS,
    TEXT_PREFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    Detection,
    detect_diffusers,
    detect_single_file,
    read_json,
)
from openldm.checkpoints.errors import (
    CheckpointError,
    CorruptCheckpointError,
    HubUnavailableError,
    MissingWeightsError,
    UnknownArchitectureError,
    UnsafeCheckpointError,
    excerpt,
)
from openldm.checkpoints.extras import build_extra_networks
from openldm.checkpoints.read import read_state_dict
from openldm.config import (
    PRESETS,
    ModelSpec,
    PredictionType,
    ScheduleConfig,
    TextConfig,
    UNetConfig,
    VAEConfig,
)
from openldm.config import preset as named_preset
from openldm.devices import resolve_device
from openldm.nn.clip import CLIPTextEncoder
from openldm.nn.clip_vision import CLIPVisionEncoder
from openldm.nn.midas import MiDaSDepthEstimator
from openldm.nn.unet import UNetModel
from openldm.nn.upcast import upcast_layers
from openldm.nn.vae import AutoencoderKL
from openldm.nn.winograd import winograd_for
from openldm.tokenizer import CLIPTokenizer

log = logging.getLogger("openldm")

StateDict = dict[str, torch.Tensor]

SCHEDULE_BUFFERS: frozenset[str] = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
    }
)
DEFAULT_SCALE_FACTOR = 0.18215
X4_SCALE_FACTOR = 0.08333
_V_BY_DEFAULT: frozenset[str] = frozenset({"x4-upscaler", "unclip"})
_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_COMPONENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_DIFFUSERS_CORE = frozenset({"unet", "vae", "text_encoder", "tokenizer", "scheduler"})
# Components of diffusers folders that are never needed (and never downloaded).
_DIFFUSERS_UNUSED = frozenset({"safety_checker", "feature_extractor"})


@dataclass
class Networks:
    """A loaded checkpoint: the spec it was built from, its three networks and its tokenizer
    (:class:`openldm.model.StableDiffusion` adds what a model makes with them)."""

    spec: ModelSpec
    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder
    tokenizer: CLIPTokenizer
    # State dicts of components recognised but not built here, by name: "depth_model",
    # "low_scale_model", "embedder", "noise_augmentor" (single files, prefix stripped) or the
    # diffusers folder names ("depth_estimator", "image_encoder", ...).
    extras: dict[str, StateDict] = field(default_factory=dict)
    source: str = ""
    # The extra networks built from ``extras`` (:mod:`openldm.checkpoints.extras`), and why one present
    # could not be built (the pipeline that needs it says so).
    depth_estimator: MiDaSDepthEstimator | None = None
    image_encoder: CLIPVisionEncoder | None = None
    unbuilt: dict[str, str] = field(default_factory=dict)
    # The files the networks were loaded from, to read their weights again (for whoever changed them and
    # wants them back exactly); None when the networks were not loaded from files.
    reread: SourceFiles | None = field(default=None, repr=False, compare=False)


class LoadOptions(TypedDict, total=False):
    """:func:`load`'s keyword arguments, for the functions that pass them on."""

    config: str | os.PathLike[str] | None
    prediction_type: PredictionType | None
    dtype: torch.dtype | None
    compute_dtype: torch.dtype | None
    winograd_memory: int | None
    device: str | torch.device
    preset: str | ModelSpec | None
    variant: str | None
    base: str | os.PathLike[str] | None


@dataclass
class _Parts:
    """What a checkpoint format yields before the networks are built (weights in our layout)."""

    detection: Detection
    unet: StateDict
    vae: StateDict
    text: StateDict
    unet_config: UNetConfig
    vae_config: VAEConfig
    text_config: TextConfig
    tokenizer: CLIPTokenizer
    extras: dict[str, StateDict]
    # The prediction type a reference yaml states (wins over a preset) and the one a diffusers
    # scheduler config states (a preset wins over it).
    yaml_prediction: PredictionType | None = None
    scheduler_prediction: PredictionType | None = None
    schedule: ScheduleConfig | None = None
    image_size: int | None = None
    # What a file written by openldm (openldm train) states in its safetensors metadata.
    metadata_prediction: PredictionType | None = None
    metadata_text_heads: int | None = None


def load(
    path_or_id: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | None = None,
    prediction_type: PredictionType | None = None,
    dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
    winograd_memory: int | None = None,
    device: str | torch.device = "cpu",
    preset: str | ModelSpec | None = None,
    variant: str | None = None,
    base: str | os.PathLike[str] | None = None,
) -> Networks:
    """Load a Stable Diffusion checkpoint's networks.

    Args:
        path_or_id: an original ``.safetensors``/``.ckpt`` file, a diffusers folder, or a hub id
            (``stabilityai/stable-diffusion-2-1``, fetched with ``huggingface_hub`` when installed).
        config: the reference's yaml config (``v2-inference-v.yaml``...), for single files.
        prediction_type: ``"eps"`` or ``"v"``; overrides everything else.
        dtype: cast the floating-point weights (default: keep the stored dtype).
        compute_dtype: compute in this dtype with the weights kept as stored (or as ``dtype``): each
            layer casts its weights for its call (:mod:`openldm.nn.upcast`). Default: float32 on a CPU
            for fp16/bf16 weights (half the memory of upcasting them, the same results), else the
            weights' dtype.
        winograd_memory: bytes the UNet's, VAE's (and ControlNets') 3x3 convolutions may keep as
            transformed filters to run by Winograd's algorithm on a CPU (:mod:`openldm.nn.winograd`;
            0: never). Default: half the memory free after loading when the UNet computes in its
            stored fp32 weights, else 0 (weights kept in half precision are a choice of memory).
        device: where the networks go.
        preset: a preset name or a :class:`ModelSpec` to build instead of reading the sizes.
        variant: diffusers weight variant to read (``"fp16"`` for ``*.fp16.safetensors``).
        base: for a UNet-only variant file (:mod:`openldm.checkpoints.variant_files`), the complete
            single file whose VAE and text encoder it shares (default: the packaged embedded model
            when the file names it as its base).
    """
    device = resolve_device(device)  # a device this machine lacks is an error before any reading
    source = os.fspath(path_or_id)
    path = Path(source)
    if base is not None and not path.is_file():
        raise ValueError(f"base= is for UNet-only variant files; {source} is not a file")
    if _HUB_ID.fullmatch(source) and not source.endswith(_CHECKPOINT_SUFFIXES) and not path.exists():
        path = _download(source, variant)
    parts = _parts(path, source, config, variant, base)
    spec = _spec(parts, source, prediction_type, preset)
    parts.tokenizer.pad_token_id = spec.text.pad_token_id  # a preset may pad differently
    unet = build_network(UNetModel, spec.unet, parts.unet, "unet", source, dtype, device)
    extra = build_extra_networks(parts.extras, source, spec.unet, dtype or _dtype_of(unet), device)
    vae = build_network(AutoencoderKL, spec.vae, parts.vae, "vae", source, dtype, device)
    text = build_network(CLIPTextEncoder, spec.text, parts.text, "text encoder", source, dtype, device)
    if compute_dtype is None and dtype is None and device.type == "cpu":
        compute_dtype = torch.float32  # half-precision weights stay so, computed in fp32
    for network in (unet, vae, text, extra.image_encoder):
        if network is not None and compute_dtype is not None:
            upcast_layers(network, compute_dtype)
    winograd_for(unet, device, winograd_memory, shared_with=(vae,))
    return Networks(
        spec=spec,
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=parts.tokenizer,
        extras=parts.extras,
        source=source,
        depth_estimator=extra.depth_estimator,
        image_encoder=extra.image_encoder,
        unbuilt=extra.unbuilt,
        reread=SourceFiles(path, source, config, variant, base),
    )


def _parts(
    path: Path,
    source: str,
    config: str | os.PathLike[str] | None,
    variant: str | None,
    base: str | os.PathLike[str] | None,
) -> _Parts:
    if path.is_dir():
        return _diffusers_parts(path, variant)
    if path.is_file():
        return _single_file_parts(path, config, base)
    raise MissingWeightsError(source, "no such file or folder", "Check the path")


@dataclass(frozen=True)
class SourceFiles:
    """Where loaded networks came from: :meth:`read` gives the UNet's and the text encoder's weights
    again (memory-mapped, our layout, stored dtype), :meth:`stamp` the size and modification time of
    every file there, to tell whether they changed since."""

    path: Path
    source: str
    config: str | os.PathLike[str] | None
    variant: str | None
    base: str | os.PathLike[str] | None

    def read(self) -> dict[str, StateDict]:
        parts = _parts(self.path, self.source, self.config, self.variant, self.base)
        return {"unet": parts.unet, "text_encoder": parts.text}

    def stamp(self) -> tuple[tuple[str, int, int], ...]:
        paths = [self.path, *([Path(self.base)] if self.base is not None else [])]
        files = [f for p in paths for f in (sorted(p.rglob("*")) if p.is_dir() else [p])]
        stats = [(os.fspath(f), f.stat()) for f in files if f.is_file()]
        return tuple((name, info.st_size, info.st_mtime_ns) for name, info in stats)


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


# --- original single files ---------------------------------------------------------------------


def _with_base(sd: StateDict, path: Path, base: str | os.PathLike[str] | None) -> StateDict:
    """A UNet-only variant file merged with its base; any other file as it is."""
    if not variant_files.is_variant_file(sd):
        if base is not None:
            raise ValueError(
                f"base= is for UNet-only variant files, but {path} is a complete checkpoint; drop base="
            )
        return sd
    metadata = variant_files.file_metadata(path)
    base = base if base is not None else variant_files.default_base(metadata)
    if base is None:
        raise MissingWeightsError(
            path,
            "it holds only a UNet (a variant file); its VAE and text encoder are in its base model "
            f"{excerpt(metadata.get(variant_files.FILE_KEY, ''))}",
            "Pass the base checkpoint it was trained on: load(path, base=FILE) or --base FILE",
        )
    return variant_files.merge_with_base(sd, metadata, read_state_dict(Path(base)), path)


def split_single_file(
    sd: Mapping[str, torch.Tensor], detection: Detection, source: str | os.PathLike[str]
) -> tuple[StateDict, StateDict, StateDict, dict[str, StateDict]]:
    """(unet, vae, text, extras) state dicts with their prefixes stripped.

    The text encoder stays in the file's layout (``detection.text_layout``). Known training-only
    entries are dropped by name; any other key is an :class:`UnknownArchitectureError`.
    """
    unet: StateDict = {}
    vae: StateDict = {}
    text: StateDict = {}
    extras: dict[str, StateDict] = {}
    text_prefix = TEXT_PREFIXES.get(detection.text_layout or "", "\0")
    unexpected: list[str] = []
    ema = 0
    for key, value in sd.items():
        if key.startswith(UNET_PREFIX):
            unet[key[len(UNET_PREFIX) :]] = value
        elif key.startswith(VAE_PREFIX + "loss."):
            continue
        elif key.startswith(VAE_PREFIX):
            vae[key[len(VAE_PREFIX) :]] = value
        elif key.startswith(text_prefix):
            if not key.endswith("position_ids"):
                text[key[len(text_prefix) :]] = value
        elif key in SCHEDULE_BUFFERS:
            continue
        elif key.startswith("model_ema."):
            ema += 1
        elif (name := key.split(".", 1)[0]) in EXTRA_COMPONENTS:
            extras.setdefault(name, {})[key[len(name) + 1 :]] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise UnknownArchitectureError(
            source,
            f"unexpected tensors for a {detection.variant} checkpoint: {examples(unexpected)}",
            "Pass an unmodified Stable Diffusion checkpoint, or remove these tensors from it",
        )
    if ema:
        log.info("%s: holds %d EMA tensors (model_ema.*); they are not used", source, ema)
    return unet, vae, text, extras


def _apply_openldm_metadata(
    metadata: Mapping[str, str],
    vae_cfg: VAEConfig,
    text_cfg: TextConfig,
    parts_kwargs: dict[str, Any],
    path: Path,
) -> tuple[VAEConfig, TextConfig]:
    """The latent scale factor, image size, prediction type and text attention heads that ``openldm
    train`` writes into its files' metadata (a yaml config, when given, still wins)."""
    try:
        if "openldm.scale_factor" in metadata:
            vae_cfg = dataclasses.replace(vae_cfg, scale_factor=float(metadata["openldm.scale_factor"]))
        if "openldm.image_size" in metadata:
            parts_kwargs["image_size"] = int(metadata["openldm.image_size"])
        if "openldm.text_heads" in metadata:
            heads = int(metadata["openldm.text_heads"])
            if heads <= 0 or text_cfg.width % heads:
                raise ValueError(f"{heads} text heads do not divide the width {text_cfg.width}")
            text_cfg = dataclasses.replace(text_cfg, heads=heads)
            parts_kwargs["metadata_text_heads"] = heads
    except ValueError as e:
        raise CorruptCheckpointError(path, f"unreadable openldm metadata ({e})", _REEXPORT) from e
    prediction = metadata.get("openldm.prediction_type")
    if prediction is not None:
        if prediction not in ("eps", "v"):
            raise CorruptCheckpointError(
                path, f"metadata names prediction type {excerpt(prediction)}", _REEXPORT
            )
        parts_kwargs["metadata_prediction"] = prediction
    return vae_cfg, text_cfg


_REEXPORT = "Export the model again (openldm train --resume --out RUN) or pass config= / preset="


def _single_file_parts(
    path: Path, config: str | os.PathLike[str] | None, base: str | os.PathLike[str] | None = None
) -> _Parts:
    sd = _with_base(read_state_dict(path), path, base)
    detection = detect_single_file(sd, path)
    unet_sd, vae_sd, text_sd, extras = split_single_file(sd, detection, path)
    yaml_params = _read_yaml(Path(config)) if config is not None else None
    for name, part in (("UNet", unet_sd), ("VAE", vae_sd), ("text encoder", text_sd)):
        if not part:
            prefix = {"UNet": UNET_PREFIX, "VAE": VAE_PREFIX}.get(name, "cond_stage_model.")
            raise CorruptCheckpointError(
                path,
                f"it has no {name} weights ({prefix}*)",
                "Use a complete checkpoint that holds the UNet, the VAE and the text encoder",
            )
    if detection.text_layout is None:  # only possible for a file without text encoder, rejected above
        raise CorruptCheckpointError(path, "no text encoder found", "Use a complete checkpoint")

    from openldm.checkpoints.formats import clip, unet, vae

    scale = X4_SCALE_FACTOR if detection.variant == "x4-upscaler" else DEFAULT_SCALE_FACTOR
    unet_cfg = _convert(path, "UNet", unet.infer_unet_config, unet_sd)
    vae_cfg = _convert(path, "VAE", vae.infer_vae_config, vae_sd, scale)
    text_cfg = _convert(path, "text encoder", clip.infer_text_config, text_sd, detection.text_layout)
    parts_kwargs: dict[str, Any] = {}
    metadata = variant_files.file_metadata(path)
    vae_cfg, text_cfg = _apply_openldm_metadata(metadata, vae_cfg, text_cfg, parts_kwargs, path)
    if yaml_params is not None:
        unet_cfg, vae_cfg, text_cfg, yaml_kwargs = _apply_yaml(
            yaml_params, unet_cfg, vae_cfg, text_cfg, config
        )
        parts_kwargs.update(yaml_kwargs)
        extras |= _yaml_extras(yaml_params, config)
    if detection.text_layout == "open_clip":
        text_ours = _convert(path, "text encoder", clip.text_from_open_clip, text_sd, text_cfg)
    else:
        text_ours = _convert(path, "text encoder", clip.text_from_transformers, text_sd)
    return _Parts(
        detection=detection,
        unet=unet_sd,
        vae=vae_sd,
        text=text_ours,
        unet_config=unet_cfg,
        vae_config=vae_cfg,
        text_config=text_cfg,
        tokenizer=CLIPTokenizer.for_config(text_cfg),
        extras=extras,
        **parts_kwargs,
    )


def _read_yaml(path: Path) -> Mapping[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorruptCheckpointError(path, "config file not found", "Check the config= path") from None
    except yaml.YAMLError as e:
        raise CorruptCheckpointError(path, f"malformed yaml ({e})", "Pass the reference's yaml config") from e
    params = data.get("model", {}).get("params") if isinstance(data, dict) else None
    if not isinstance(params, dict):
        raise CorruptCheckpointError(
            path, "no model.params section", "Pass a reference config such as v2-inference-v.yaml"
        )
    return params


_UNET_YAML_FIELDS = {f.name for f in dataclasses.fields(UNetConfig)} - {"num_heads", "num_head_channels"}
_VAE_YAML_FIELDS = ("in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks", "z_channels")


def _tuples(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _apply_yaml(
    params: Mapping[str, Any],
    unet_cfg: UNetConfig,
    vae_cfg: VAEConfig,
    text_cfg: TextConfig,
    path: str | os.PathLike[str],
) -> tuple[UNetConfig, VAEConfig, TextConfig, dict[str, Any]]:
    """Sizes, scale factor, schedule and prediction type from a reference yaml's ``model.params``."""
    unet_params = params.get("unet_config", {}).get("params", {})
    changes = {k: _tuples(v) for k, v in unet_params.items() if k in _UNET_YAML_FIELDS}
    if "num_heads" in unet_params or "num_head_channels" in unet_params:
        # The reference's -1 means "not set"; exactly one of the two is set.
        for key in ("num_heads", "num_head_channels"):
            value = unet_params.get(key, -1)
            changes[key] = None if value == -1 else value
    first_stage = params.get("first_stage_config", {}).get("params", {})
    dd = first_stage.get("ddconfig", {})
    vae_changes = {k: _tuples(dd[k]) for k in _VAE_YAML_FIELDS if k in dd}
    if "embed_dim" in first_stage:
        vae_changes["embed_dim"] = first_stage["embed_dim"]
    if "scale_factor" in params:
        vae_changes["scale_factor"] = float(params["scale_factor"])
    if params.get("cond_stage_config", {}).get("params", {}).get("layer") == "last":
        text_cfg = dataclasses.replace(text_cfg, layers=text_cfg.layers + 1)
    try:
        unet_cfg = dataclasses.replace(unet_cfg, **changes)
        vae_cfg = dataclasses.replace(vae_cfg, **vae_changes)
    except (TypeError, ValueError) as e:
        raise UnknownArchitectureError(
            path, f"its sizes do not form a valid model ({e})", "Fix the yaml"
        ) from e

    parameterization = params.get("parameterization", "eps")
    if parameterization not in ("eps", "v"):
        raise UnknownArchitectureError(
            path, f"parameterization {excerpt(parameterization)} is not supported", "Only 'eps' and 'v' are"
        )
    extra: dict[str, Any] = {"yaml_prediction": parameterization}
    if {"linear_start", "linear_end", "timesteps"} & set(params):
        default = ScheduleConfig()
        extra["schedule"] = ScheduleConfig(
            beta_start=float(params.get("linear_start", default.beta_start)),
            beta_end=float(params.get("linear_end", default.beta_end)),
            num_timesteps=int(params.get("timesteps", default.num_timesteps)),
        )
    if "image_size" in params:
        extra["image_size"] = int(params["image_size"]) * vae_cfg.downsampling_factor
    return unet_cfg, vae_cfg, text_cfg, extra


def _yaml_extras(params: Mapping[str, Any], path: str | os.PathLike[str]) -> dict[str, StateDict]:
    """The x4 upscaler's ``low_scale_config`` (its low-res noise schedule and highest noise level) as
    ``extras["low_scale_config"]``: numbers kept as 0-d tensors, read by :mod:`openldm.pipelines.upscale`."""
    low_scale = params.get("low_scale_config", {}).get("params")
    if not isinstance(low_scale, dict):
        return {}
    schedule = low_scale.get("noise_schedule_config", {})
    numbers = {
        "linear_start": schedule.get("linear_start"),
        "linear_end": schedule.get("linear_end"),
        "timesteps": schedule.get("timesteps"),
        "max_noise_level": low_scale.get("max_noise_level"),
    }
    try:
        return {
            "low_scale_config": {
                k: torch.tensor(float(v), dtype=torch.float64) for k, v in numbers.items() if v is not None
            }
        }
    except (TypeError, ValueError) as e:
        raise UnknownArchitectureError(
            path, f"low_scale_config holds a value that is not a number ({e})", "Fix the yaml"
        ) from e


# --- diffusers folders and hub ids -------------------------------------------------------------


def _diffusers_parts(folder: Path, variant: str | None) -> _Parts:
    from openldm.checkpoints.formats import clip, unet, vae

    detection = detect_diffusers(folder)
    unet_json = read_json(folder / "unet" / "config.json", "unet/config.json")
    vae_json = read_json(folder / "vae" / "config.json", "vae/config.json")
    text_json = read_json(folder / "text_encoder" / "config.json", "text_encoder/config.json")
    tokenizer = _diffusers_tokenizer(folder, detection)

    unet_cfg = _convert(folder / "unet", "UNet", unet.unet_config_from_diffusers, unet_json)
    vae_cfg = _convert(folder / "vae", "VAE", vae.vae_config_from_diffusers, vae_json)
    if "scaling_factor" not in vae_json:
        scale = X4_SCALE_FACTOR if detection.variant == "x4-upscaler" else DEFAULT_SCALE_FACTOR
        vae_cfg = dataclasses.replace(vae_cfg, scale_factor=scale)
    text_cfg = _convert(
        folder / "text_encoder",
        "text encoder",
        clip.text_config_from_transformers,
        text_json,
        tokenizer.pad_token_id,
    )
    unet_sd = _convert(
        folder / "unet",
        "UNet",
        unet.unet_from_diffusers,
        component_weights(folder, "unet", variant),
        unet_cfg,
    )
    vae_sd = _convert(
        folder / "vae", "VAE", vae.vae_from_diffusers, component_weights(folder, "vae", variant), vae_cfg
    )
    text_sd = _convert(
        folder / "text_encoder",
        "text encoder",
        clip.text_from_transformers,
        component_weights(folder, "text_encoder", variant),
    )
    parts = _Parts(
        detection=detection,
        unet=unet_sd,
        vae=vae_sd,
        text=text_sd,
        unet_config=unet_cfg,
        vae_config=vae_cfg,
        text_config=text_cfg,
        tokenizer=tokenizer,
        extras=_diffusers_extras(folder, variant),
    )
    sample_size = unet_json.get("sample_size")
    if isinstance(sample_size, int):
        parts.image_size = sample_size * vae_cfg.downsampling_factor
    _read_scheduler(folder, parts)
    return parts


def _diffusers_tokenizer(folder: Path, detection: Detection) -> CLIPTokenizer:
    tok = folder / "tokenizer"
    if (tok / "vocab.json").is_file() and (tok / "merges.txt").is_file():
        default_pad = 0 if detection.features.text_family == "openclip" else 49407
        try:
            return CLIPTokenizer.from_files(tok / "vocab.json", tok / "merges.txt", pad_token_id=default_pad)
        except (ValueError, OSError) as e:
            raise CorruptCheckpointError(
                tok, f"unreadable tokenizer ({e})", "Download the folder again"
            ) from e
    raise CorruptCheckpointError(
        tok, "missing vocab.json / merges.txt", "Download the tokenizer/ folder of the model"
    )


def _read_scheduler(folder: Path, parts: _Parts) -> None:
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return
    cfg = read_json(path, "scheduler/scheduler_config.json")
    kinds = {"epsilon": "eps", "v_prediction": "v"}
    if "prediction_type" in cfg:
        if cfg["prediction_type"] not in kinds:
            raise UnknownArchitectureError(
                path,
                f"prediction_type {excerpt(cfg['prediction_type'])} is not supported",
                "Pass prediction_type='eps' or 'v' to load()",
            )
        parts.scheduler_prediction = kinds[cfg["prediction_type"]]  # type: ignore[assignment]
    if cfg.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise UnknownArchitectureError(
            path,
            f"beta_schedule {excerpt(cfg['beta_schedule'])} is not the reference's (scaled_linear)",
            "Stable Diffusion checkpoints are trained with scaled_linear betas; check the scheduler config",
        )
    default = ScheduleConfig()
    parts.schedule = ScheduleConfig(
        beta_start=float(cfg.get("beta_start", default.beta_start)),
        beta_end=float(cfg.get("beta_end", default.beta_end)),
        num_timesteps=int(cfg.get("num_train_timesteps", default.num_timesteps)),
    )


def _diffusers_extras(folder: Path, variant: str | None) -> dict[str, StateDict]:
    index = read_json(folder / "model_index.json", "model_index.json")
    extras: dict[str, StateDict] = {}
    for name, value in index.items():
        if name.startswith("_") or name in _DIFFUSERS_CORE | _DIFFUSERS_UNUSED or not isinstance(value, list):
            continue
        if not _COMPONENT_NAME.fullmatch(name):  # a component is a folder of this one, named plainly
            raise UnsafeCheckpointError(
                folder / "model_index.json",
                f"it names a component {excerpt(name)}, which is not a plain folder name",
                "Use the folder as published",
            )
        if (folder / name).is_dir() and any(c.is_file() for c in weight_candidates(folder / name, variant)):
            extras[name] = component_weights(folder, name, variant)
    return extras


def _download(repo_id: str, variant: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise HubUnavailableError(
            repo_id, "huggingface_hub is not installed: pip install 'openldm[hub]'"
        ) from None
    tag = f".{variant}" if variant else ""
    patterns = ["model_index.json", "*/*.json", "*/*.txt", f"*/*{tag}.safetensors"]
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=["safety_checker/*"])
    except Exception as e:  # offline, unknown repo, network errors: all mean "not available here"
        raise HubUnavailableError(repo_id, _first_line(e)) from e
    return Path(folder)


def _first_line(error: Exception) -> str:
    """``error`` in one line: hub errors carry paragraphs of advice that do not apply here."""
    text = str(error).strip().splitlines()
    first = text[0].rstrip(".") if text else ""
    offline = "offline" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") else ""
    words = ", ".join(w for w in (type(error).__name__, offline) if w)
    return f"{words}: {first}" if first else words


# --- spec, networks ----------------------------------------------------------------------------


def _spec(
    parts: _Parts,
    source: str,
    prediction_type: PredictionType | None,
    preset: str | ModelSpec | None,
) -> ModelSpec:
    variant = parts.detection.variant
    chosen = named_preset(preset) if isinstance(preset, str) else preset
    if chosen is not None and chosen.variant != variant:
        raise UnknownArchitectureError(
            source,
            f"the checkpoint is a {variant} model but the preset {chosen.name!r} is a {chosen.variant} model",
            "Pass a matching preset, or none to read the sizes from the checkpoint",
        )
    pred, why = _prediction(parts, source, prediction_type, chosen)
    if chosen is not None:
        heads = parts.metadata_text_heads
        if heads is not None and heads != chosen.text.heads:
            # Heads are not in the weights: the file's own statement is believed over the preset's.
            log.info(
                "%s: %d text attention heads (the file's metadata; the preset says %d)",
                source,
                heads,
                chosen.text.heads,
            )
            chosen = dataclasses.replace(chosen, text=dataclasses.replace(chosen.text, heads=heads))
        return dataclasses.replace(chosen, prediction_type=pred)
    schedule = parts.schedule or (
        ScheduleConfig(beta_start=0.0001, beta_end=0.02) if variant == "x4-upscaler" else ScheduleConfig()
    )
    image_size = parts.image_size or (768 if variant in ("sd2", "unclip") and pred == "v" else 512)
    try:
        spec = ModelSpec(
            "custom",
            variant,
            parts.unet_config,
            parts.vae_config,
            parts.text_config,
            prediction_type=pred,
            schedule=schedule,
            image_size=image_size,
        )
    except ValueError as e:
        raise UnknownArchitectureError(
            source, f"inconsistent model ({e})", "Check that the parts belong together"
        ) from e
    log.info("%s: %s model, prediction type %s (%s)", source, variant, pred, why)
    return dataclasses.replace(spec, name=_matching_preset(spec))


def _prediction(
    parts: _Parts, source: str, explicit: PredictionType | None, chosen: ModelSpec | None
) -> tuple[PredictionType, str]:
    """The prediction type and where it came from (see the module docstring for the order)."""
    if explicit is not None:
        if explicit not in ("eps", "v"):
            raise ValueError(f"prediction_type must be 'eps' or 'v', got {explicit!r}")
        return explicit, "the prediction_type option"
    if parts.yaml_prediction is not None:
        return parts.yaml_prediction, "the yaml config"
    if chosen is not None:
        return chosen.prediction_type, f"preset {chosen.name}"
    if parts.metadata_prediction is not None:
        return parts.metadata_prediction, "the file's openldm metadata"
    if parts.scheduler_prediction is not None:
        return parts.scheduler_prediction, "scheduler/scheduler_config.json"
    variant = parts.detection.variant
    default: PredictionType = "v" if variant in _V_BY_DEFAULT else "eps"
    level = logging.WARNING if variant == "sd2" else logging.INFO
    log.log(
        level,
        "%s: the checkpoint does not say its prediction type; using %r, the default for %s models. "
        "Pass prediction_type='eps' or 'v' (or config= the reference yaml) to override",
        source,
        default,
        variant,
    )
    return default, "default"


def _matching_preset(spec: ModelSpec) -> str:
    for name, known in PRESETS.items():
        if dataclasses.replace(known, name=spec.name, image_size=spec.image_size) == spec:
            return name
    return f"custom-{spec.variant}"


def _convert(source: str | os.PathLike[str], what: str, fn: Any, *args: Any) -> Any:
    """Run a ``formats`` function; its ``ValueError``/``KeyError`` becomes an error naming the file."""
    try:
        return fn(*args)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError) as e:  # TypeError: a config value of the wrong JSON type
        raise UnknownArchitectureError(
            source, f"the {what} cannot be read ({e})", "Check that this is a Stable Diffusion checkpoint"
        ) from e


# --- description -------------------------------------------------------------------------------


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _dtypes(module: nn.Module) -> str:
    return "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters()}))


def describe(model: Networks) -> str:
    """A few lines on what was loaded: variant, sizes, prediction type, dtype, parameter counts."""
    s = model.spec
    u, v, t = s.unet, s.vae, s.text
    heads = f"{u.num_heads} heads" if u.num_heads is not None else f"{u.num_head_channels}-wide heads"
    classes = "" if u.num_classes is None else f", class embedding {u.num_classes}"
    nets = {"unet": model.unet, "vae": model.vae, "text encoder": model.text_encoder}
    sizes = {name: f"{_count(net) / 1e6:.1f}M params, {_dtypes(net)}" for name, net in nets.items()}
    lines = [
        f"source:       {model.source}",
        f"model:        {s.name} (variant {s.variant}), prediction {s.prediction_type}, {s.image_size}px",
        f"unet:         {sizes['unet']}; in {u.in_channels}, channels {u.model_channels} x "
        f"{list(u.channel_mult)}, {heads}, context {u.context_dim}{classes}",
        f"vae:          {sizes['vae']}; ch {v.ch} x {list(v.ch_mult)}, scale factor {v.scale_factor}",
        f"text encoder: {sizes['text encoder']}; width {t.width}, {t.layers} layers, {t.activation}, "
        f"pad id {t.pad_token_id}",
        f"schedule:     betas {s.schedule.beta_start}..{s.schedule.beta_end}, {s.schedule.num_timesteps} "
        "steps",
    ]
    for name, sd in model.extras.items():
        values = sum(x.numel() for x in sd.values())
        lines.append(f"extra:        {name}: {len(sd)} tensors, {values / 1e6:.1f}M values")
    return "\n".join(lines)
