"""What every generation shares, in one frozen object validated once, when it is built.

The Python API (``model.txt2img(prompt, steps=25, ...)``), the command line and the server all build a
:class:`GenerationOptions`; the pipelines read it and check only what depends on the model (its
variant, its size multiple, its schedule's length, the memory a request needs). What is a pipeline's own
(an init image, a strength, a mask) is not here: each pipeline takes it beside the options.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import torch

from openldm.sampling.samplers import SAMPLERS, SamplerInfo

Precision = Literal["fp32", "fp16", "bf16"]
OutputType = Literal["pil", "np", "pt", "latent"]
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OUTPUT_TYPES: tuple[str, ...] = ("pil", "np", "pt", "latent")
VaeTiling = Literal["auto", "on", "off"]
VAE_TILINGS: tuple[str, ...] = ("auto", "on", "off")
Prompt = str | Sequence[str]
# ``callback(step, total, x, x0)`` after every sampler step (``x`` in sigma space, ``x0`` its denoised).
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
SEED_LIMIT = 2**64


class OptionError(ValueError):
    """A generation option out of its range; ``field`` names it, so that the command line can say
    which of its flags was wrong."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


# "balanced": on both halves of guidance; "prompt": both halves, each residual scaled from 0.1 (first block)
# to 1 (middle); "control": that, on the conditional half only (diffusers' guess mode).
ControlMode = Literal["balanced", "prompt", "control"]
CONTROL_MODES: tuple[ControlMode, ...] = ("balanced", "prompt", "control")
# The web UI's names of the modes, as its PNG parameters and its API's control_mode write them.
CONTROL_MODE_NAMES: dict[ControlMode, str] = {
    "balanced": "Balanced",
    "prompt": "My prompt is more important",
    "control": "ControlNet is more important",
}


@dataclass(frozen=True)
class Control:
    """One ControlNet's guidance: the network (``model.load_controlnet``), its control image (PIL, or a
    tensor [3, H, W] in [0, 1]), its weight, the fraction of the steps it guides (``start`` to ``end``)
    and its ``mode`` (the web UI's control modes; see :mod:`openldm.pipelines.control`). ``module``:
    the preprocessor that made the image, for the PNG parameters."""

    network: Any
    image: Any
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: ControlMode = "balanced"
    module: str = "none"

    def __post_init__(self) -> None:
        if self.mode not in CONTROL_MODES:
            raise OptionError(
                "controls", f"control mode must be one of {', '.join(CONTROL_MODES)}, got {self.mode!r}"
            )
        if not _number(self.weight):
            raise OptionError("controls", f"a control weight must be a finite number, got {self.weight!r}")
        if not (_number(self.start) and _number(self.end) and 0 <= self.start < self.end <= 1):
            raise OptionError(
                "controls",
                f"control start and end must satisfy 0 <= start < end <= 1, got {self.start}, {self.end}",
            )


HiresUpscaler = Literal["latent", "lanczos"]


@dataclass(frozen=True)
class Hires:
    """The web UI's hires fix: upscale by ``scale`` (``upscaler``: the latents, or the decoded images
    with Lanczos) and img2img at the larger size with ``strength`` over ``steps`` (None: the run's)."""

    scale: float = 2.0
    steps: int | None = None
    strength: float = 0.7
    upscaler: HiresUpscaler = "latent"

    def __post_init__(self) -> None:
        if not _number(self.scale) or not 1 < self.scale <= 4:
            raise OptionError("hires", f"hires scale must be in (1, 4], got {self.scale!r}")
        if self.steps is not None:
            _whole("hires steps", self.steps, low=1)
        if not _number(self.strength) or not 0 <= self.strength <= 1:
            raise OptionError("hires", f"hires strength must be in [0, 1], got {self.strength!r}")
        if self.upscaler not in ("latent", "lanczos"):
            raise OptionError("hires", f"unknown hires upscaler {self.upscaler!r}; use latent or lanczos")


@dataclass(frozen=True)
class GenerationOptions:
    """The options of one generation call (every pipeline's; the defaults are txt2img's).

    ``prompt``: one prompt or several (each gets ``n_samples`` images in a row); ``negative_prompt``: one
    for all or one per prompt; both are kept as tuples. ``width``/``height`` (pixels, None: the model's
    or the init image's size). ``sampler``: a name of :data:`~openldm.sampling.samplers.SAMPLERS` with
    its ``eta`` (None: the sampler's default) and ``karras`` spacing. ``seed`` (None: random) seeds the CPU
    generator that draws all the noise, unless ``generator`` is given. ``noise``: the unit starting noise
    for every repeat; ``fixed_code``: draw it once and reuse it. ``weighting``: read ``(word:1.3)`` as
    weights. ``precision``: None runs the weights as loaded, fp16/bf16 autocast. ``output_type``: PIL
    images, arrays or tensors in [0, 1], or "latent" (no decoding). ``callback`` runs after every step;
    ``progress`` shows a bar. ``clip_skip``: the web UI's clip skip, 1 uses the text encoder's last
    layer, N the output of the N-th layer from the end (then its final layer norm). ``cfg_end``: the
    fraction of the steps that are guided (the rest run the conditional half only). ``feature_reuse``: N
    runs the whole UNet every N-th call and only its outermost blocks between, on the deep feature kept
    from the last whole call (DeepCache; 1: off). ``token_merging``: the fraction of the tokens merged
    before each full-resolution self-attention (ToMe for SD, :mod:`openldm.nn.token_merging`; 0: off; the
    web UI's "Token merging ratio"). ``vae_tiling``: code images by bands of rows in bounded
    memory (:mod:`openldm.nn.vae_bands`: whole-image statistics, no seams): "auto" when the whole image
    would take more than half the free memory, "on" always, "off" never. ``controls``: the
    ControlNets that guide the run (:class:`Control`). ``hires``: the hires fix (txt2img only).
    """

    prompt: Prompt
    negative_prompt: Prompt = ""
    steps: int = 50
    guidance_scale: float = 7.5
    width: int | None = None
    height: int | None = None
    sampler: str = "ddim"
    eta: float | None = None
    karras: bool = False
    seed: int | None = None
    n_samples: int = 1
    n_iter: int = 1
    noise: torch.Tensor | None = None
    fixed_code: bool = False
    generator: torch.Generator | None = None
    weighting: bool = True
    precision: Precision | None = None
    output_type: OutputType = "pil"
    callback: Callback | None = None
    progress: bool = True
    clip_skip: int = 1
    cfg_end: float = 1.0
    feature_reuse: int = 1
    token_merging: float = 0.0
    vae_tiling: VaeTiling = "auto"
    controls: tuple[Control, ...] = ()
    hires: Hires | None = None

    def __post_init__(self) -> None:
        prompts = _prompts("prompt", self.prompt)
        object.__setattr__(self, "prompt", prompts)
        object.__setattr__(self, "negative_prompt", _negatives(self.negative_prompt, len(prompts)))
        for name in ("steps", "n_samples", "n_iter", "clip_skip", "feature_reuse"):
            _whole(name, getattr(self, name), low=1)
        for name in ("width", "height"):  # their range depends on the model (multiples of its VAE factor)
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise OptionError(name, f"{name} must be a whole number of pixels, got {value!r}")
        if not _number(self.guidance_scale) or self.guidance_scale < 0:
            raise OptionError(
                "guidance_scale",
                "guidance scale must be a finite number >= 0 (1 turns guidance off), "
                f"got {self.guidance_scale!r}",
            )
        self._check_speed_options()
        if self.sampler not in SAMPLERS:
            raise OptionError(
                "sampler", f"unknown sampler {self.sampler!r}; choose one of: {', '.join(SAMPLERS)}"
            )
        self._check_eta()
        if self.seed is not None:
            _whole("seed", self.seed, low=0, high=SEED_LIMIT)
        if self.precision is not None and self.precision not in PRECISIONS:
            raise OptionError(
                "precision",
                f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)} or None",
            )
        if self.output_type not in OUTPUT_TYPES:
            raise OptionError(
                "output_type",
                f"unknown output_type {self.output_type!r}; use one of {', '.join(OUTPUT_TYPES)}",
            )
        if self.hires is not None and not isinstance(self.hires, Hires):
            raise OptionError("hires", "hires must be a Hires object (openldm.pipelines.options.Hires)")
        object.__setattr__(self, "controls", tuple(self.controls))
        if not all(isinstance(c, Control) for c in self.controls):
            raise OptionError(
                "controls", "controls must be Control objects (openldm.pipelines.options.Control)"
            )
        if self.noise is not None and not isinstance(self.noise, torch.Tensor):
            raise OptionError("noise", f"noise must be a tensor, got {type(self.noise).__name__}")
        if self.feature_reuse > 1 and self.controls:
            raise OptionError(
                "feature_reuse",
                "feature_reuse does not combine with ControlNets (their residuals need every block)",
            )

    def _check_speed_options(self) -> None:
        if not _number(self.cfg_end) or not 0 < self.cfg_end <= 1:
            raise OptionError(
                "cfg_end",
                f"cfg_end (the guided fraction of the steps) must be in (0, 1], got {self.cfg_end!r}",
            )
        if not _number(self.token_merging) or not 0 <= self.token_merging < 1:
            raise OptionError(
                "token_merging",
                "token_merging (the fraction of tokens merged) must be in [0, 1), "
                f"got {self.token_merging!r}",
            )
        if self.vae_tiling not in VAE_TILINGS:
            raise OptionError(
                "vae_tiling", f"unknown vae_tiling {self.vae_tiling!r}; use one of {', '.join(VAE_TILINGS)}"
            )

    def _check_eta(self) -> None:
        if self.eta is None:
            return
        if not _number(self.eta) or self.eta < 0:
            raise OptionError("eta", f"eta must be a finite number >= 0, got {self.eta!r}")
        if self.eta != 0 and not self.sampler_info.has_eta:
            with_eta = ", ".join(name for name, info in SAMPLERS.items() if info.has_eta)
            raise OptionError(
                "eta", f"eta must be 0 for the {self.sampler} sampler: only {with_eta} have an eta"
            )

    @property
    def sampler_info(self) -> SamplerInfo:
        return SAMPLERS[self.sampler]

    @property
    def sampler_options(self) -> dict[str, float]:
        """The sampler's keyword options: ``eta`` when given and the sampler has one."""
        return {"eta": float(self.eta)} if self.eta is not None and self.sampler_info.has_eta else {}

    @property
    def images_per_repeat(self) -> int:
        return len(self.prompt) * self.n_samples

    def batch(self) -> tuple[list[str], list[str]]:
        """The prompt and negative prompt of every image of a repeat: each prompt ``n_samples`` times."""
        repeat = range(self.n_samples)
        return [p for p in self.prompt for _ in repeat], [p for p in self.negative_prompt for _ in repeat]

    def replace(self, **changes: Any) -> GenerationOptions:
        return dataclasses.replace(self, **changes)


class OptionFields(TypedDict, total=False):
    """:class:`GenerationOptions`' fields but the prompts, as keyword arguments (``**options``)."""

    steps: int
    guidance_scale: float
    width: int | None
    height: int | None
    sampler: str
    eta: float | None
    karras: bool
    seed: int | None
    n_samples: int
    n_iter: int
    noise: torch.Tensor | None
    fixed_code: bool
    generator: torch.Generator | None
    weighting: bool
    precision: Precision | None
    output_type: OutputType
    callback: Callback | None
    progress: bool
    clip_skip: int
    cfg_end: float
    feature_reuse: int
    token_merging: float
    vae_tiling: VaeTiling
    controls: tuple[Control, ...]
    hires: Hires | None


def build_options(
    prompt: Prompt,
    negative_prompt: Prompt,
    fields: Mapping[str, Any],
    defaults: Mapping[str, Any] | None = None,
) -> GenerationOptions:
    """:class:`GenerationOptions` from keyword arguments over a pipeline's own ``defaults``; an unknown
    keyword is a ``TypeError`` naming it, as for any function."""
    unknown = sorted(set(fields) - set(OptionFields.__annotations__))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
    return GenerationOptions(prompt, negative_prompt, **{**(defaults or {}), **fields})


def _prompts(name: str, value: Any) -> tuple[str, ...]:
    prompts = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list | tuple) else ()
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise OptionError(name, f"{name} must be a string or a non-empty list of strings")
    return prompts


def _negatives(value: Any, count: int) -> tuple[str, ...]:
    negatives = (
        (value,) * count
        if isinstance(value, str)
        else tuple(value)
        if isinstance(value, list | tuple)
        else ()
    )
    if len(negatives) != count or not all(isinstance(p, str) for p in negatives):
        raise OptionError(
            "negative_prompt",
            f"negative_prompt must be a string or a list of {count} strings (one per prompt), got {value!r}",
        )
    return negatives


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _whole(name: str, value: Any, *, low: int, high: int | None = None) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value >= high)
    ):
        limit = f"in [{low}, 2**64)" if high == SEED_LIMIT else f">= {low}"
        raise OptionError(name, f"{name} must be a whole number {limit}, got {value!r}")
