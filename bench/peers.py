"""The peer of the benchmarks: diffusers (and transformers) given exactly openldm's weights, in memory.

No file on disk and no copy of the UNet or VAE weights: openldm's state dicts go through openldm's own
key maps (``openldm.checkpoints.formats``) and ``load_state_dict(..., assign=True)`` into networks built
on the meta device. The text encoder is built for real (transformers keeps a non-persistent buffer
that the meta device would leave empty) and gets a copy. Also the matching diffusers scheduler of each
openldm sampler, timing helpers and peak-memory readings shared by the benchmarks.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from openldm.config import ModelSpec

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # openldm and tests.tiny from this checkout, installed or not
    sys.path.insert(0, str(REPO))

StateDict = dict[str, torch.Tensor]

# openldm sampler -> (diffusers scheduler class, extra config): the pairs the parity tests check.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": False, "clip_sample": False}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


# --- networks ------------------------------------------------------------------------------------


def _assigned(factory: Callable[[], nn.Module], sd: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    """``factory()`` built on the meta device, then given ``sd``'s tensors themselves (strict)."""
    with torch.device("meta"):
        net = factory()
    net.load_state_dict(dict(sd), strict=True, assign=True)
    empty = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if empty:
        raise RuntimeError(f"{what}: tensors left without values after loading: {empty[:5]}")
    return net.eval().requires_grad_(False)


def diffusers_unet(spec: ModelSpec, sd: Mapping[str, torch.Tensor]) -> nn.Module:
    """diffusers' ``UNet2DConditionModel`` holding the openldm-layout UNet weights ``sd``."""
    from diffusers import UNet2DConditionModel

    from openldm.checkpoints.formats.unet import unet_config_to_diffusers, unet_to_diffusers

    config = unet_config_to_diffusers(spec.unet)
    config["sample_size"] = spec.image_size // spec.vae.downsampling_factor  # img2img-style pipelines read it
    theirs = unet_to_diffusers(sd, spec.unet)
    return _assigned(lambda: UNet2DConditionModel.from_config(config), theirs, "diffusers UNet")


def diffusers_vae(spec: ModelSpec, sd: Mapping[str, torch.Tensor]) -> nn.Module:
    """diffusers' ``AutoencoderKL`` (with openldm's latent scale factor) holding the VAE weights ``sd``."""
    from diffusers import AutoencoderKL

    from openldm.checkpoints.formats.vae import vae_config_to_diffusers, vae_to_diffusers

    config = vae_config_to_diffusers(spec.vae)
    theirs = vae_to_diffusers(sd, spec.vae)

    def build() -> nn.Module:
        vae = AutoencoderKL.from_config(config)
        _reference_encoder_input(vae.encoder, spec.vae.ch)
        return vae

    return _assigned(build, theirs, "diffusers VAE")


def _reference_encoder_input(encoder: nn.Module, ch: int) -> None:
    """Make diffusers' encoder start as the reference's: ``conv_in`` to ``ch`` channels, then the first
    res block from ``ch`` to ``ch * ch_mult[0]`` (with its shortcut).

    diffusers' config cannot say this: its ``conv_in`` gives ``block_out_channels[0]``, which is the same
    only when ``ch_mult[0] == 1`` (every published SD VAE; not the embedded model's ``(2, 2, 2, 2)``).
    The replacement is diffusers' own ``ResnetBlock2D``, configured as the one it replaces.
    """
    from diffusers.models.resnet import ResnetBlock2D

    if encoder.conv_in.out_channels == ch:
        return
    first = encoder.down_blocks[0].resnets[0]
    encoder.conv_in = nn.Conv2d(encoder.conv_in.in_channels, ch, kernel_size=3, padding=1)
    encoder.down_blocks[0].resnets[0] = ResnetBlock2D(
        in_channels=ch,
        out_channels=first.out_channels,
        temb_channels=None,
        eps=first.norm1.eps,
        groups=first.norm1.num_groups,
        dropout=0.0,
        non_linearity="silu",
        output_scale_factor=first.output_scale_factor,
        pre_norm=True,
    )


def transformers_text_encoder(spec: ModelSpec, sd: Mapping[str, torch.Tensor]) -> nn.Module:
    """transformers' ``CLIPTextModel`` with the text encoder weights ``sd`` (copied)."""
    import transformers

    from openldm.checkpoints.formats.clip import PREFIX, text_config_to_transformers, text_to_transformers

    config = transformers.CLIPTextConfig(**text_config_to_transformers(spec.text))
    net = transformers.CLIPTextModel(config)
    theirs = text_to_transformers(sd)
    # transformers 4.x names the keys text_model.*, 5.x without the prefix: follow the model.
    if not any(k.startswith(PREFIX) for k in net.state_dict()):
        theirs = {k.removeprefix(PREFIX): v for k, v in theirs.items()}
    dtype = next(iter(sd.values())).dtype
    net.load_state_dict(theirs, strict=True)
    return net.to(dtype).eval().requires_grad_(False)


def transformers_tokenizer(spec: ModelSpec, folder: Path) -> Any:
    """transformers' ``CLIPTokenizer`` over openldm's packaged vocabulary, padding as ``spec`` does."""
    import transformers

    from openldm.tokenizer import packaged_vocab

    vocab = packaged_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab.encoder, ensure_ascii=False), encoding="utf-8")
    merges = sorted(vocab.ranks, key=vocab.ranks.__getitem__)
    lines = "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + lines, encoding="utf-8")
    pad = {i: t for t, i in vocab.encoder.items()}[spec.text.pad_token_id]
    return transformers.CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        pad_token=pad,
        model_max_length=spec.text.max_length,
    )


def diffusers_scheduler(sampler: str, spec: ModelSpec) -> Any:
    """The diffusers scheduler that computes what openldm's ``sampler`` does for a model of ``spec``."""
    import diffusers

    from openldm.sampling.samplers import get_sampler

    if sampler not in SCHEDULERS:
        raise ValueError(f"no diffusers peer for sampler {sampler!r}; choose from {', '.join(SCHEDULERS)}")
    name, extra = SCHEDULERS[sampler]
    config = {
        "num_train_timesteps": spec.schedule.num_timesteps,
        "beta_start": spec.schedule.beta_start,
        "beta_end": spec.schedule.beta_end,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "prediction_type": "v_prediction" if spec.prediction_type == "v" else "epsilon",
        "timestep_spacing": get_sampler(sampler).spacing,
        **extra,
    }
    return getattr(diffusers, name)(**config)


def sd_components(spec: ModelSpec, unet: StateDict, vae: StateDict, text: StateDict, folder: Path) -> dict:
    """The components every Stable Diffusion pipeline of diffusers takes (DDIM scheduler)."""
    return {
        "vae": diffusers_vae(spec, vae),
        "text_encoder": transformers_text_encoder(spec, text),
        "tokenizer": transformers_tokenizer(spec, folder),
        "unet": diffusers_unet(spec, unet),
        "scheduler": diffusers_scheduler("ddim", spec),
    }


# --- measuring -----------------------------------------------------------------------------------


class StepClock:
    """Timestamps taken after every denoising step, from either tool's per-step callback."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def tick(self, *args: Any) -> Any:
        """openldm's ``callback(i, total, x, x0)``, diffusers' ``callback(i, t, latents)`` or
        ``callback_on_step_end(pipe, i, t, tensors)`` (which must hand its tensor dict back)."""
        self.times.append(time.perf_counter())
        return args[-1] if len(args) == 4 and isinstance(args[-1], dict) else None

    def step_seconds(self, warmup: int) -> list[float]:
        """Durations of the steps after the first ``warmup`` (>= 1): each from the end of the one before."""
        if warmup < 1:
            raise ValueError("at least one warm-up step is needed (its end starts the first timed step)")
        if len(self.times) <= warmup:
            raise RuntimeError(f"only {len(self.times)} steps were seen; at least {warmup + 1} needed")
        return [b - a for a, b in zip(self.times[warmup - 1 : -1], self.times[warmup:], strict=True)]


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def rss_mb() -> float:
    return _status_mb("VmRSS:")


def peak_mb() -> float:
    """VmHWM (reset by :func:`reset_peak`), or ``ru_maxrss`` where /proc is missing."""
    try:
        return _status_mb("VmHWM:")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        line = next(ln for ln in f if ln.startswith(field))
    return int(line.split()[1]) / 1024


def quiet_environment() -> dict[str, str]:
    """The environment for subprocesses: offline, no progress bars."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
