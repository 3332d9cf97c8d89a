"""The generation commands' flags: the reference scripts' (``scripts/txt2img.py``, ``img2img.py``) with
their defaults, plus ours, in groups that each command takes as it needs (``upscale`` has no --H/--W)."""

from __future__ import annotations

import argparse
from typing import Any

from openldm.commands.common import DEFAULT_PROMPT
from openldm.commands.control_flags import add_control_flags

# Guidance scale defaults of the reference scripts: SD 1's, and SD 2's (for SD 2 models).
DEFAULT_SCALES = {"txt2img": (7.5, 9.0), "img2img": (5.0, 9.0)}
PRECISION_CHOICES = ["autocast", "full", "fp32", "fp16", "bf16"]


class Flags:
    """Adds flags to a parser; ``defaults`` / ``helps`` (by dest: ``strength``, ``outdir``, ``scale``...)
    replace a flag's default and help text for the command at hand."""

    def __init__(
        self, parser: argparse.ArgumentParser, defaults: dict[str, Any] | None, helps: dict[str, str] | None
    ) -> None:
        self.parser = parser
        self.defaults, self.helps = defaults or {}, helps or {}
        self.unused = set(self.defaults) | set(self.helps)

    def add(self, *flags: str, **options: Any) -> None:
        dest = flags[0].lstrip("-").replace("-", "_")
        self.unused.discard(dest)
        if dest in self.defaults:
            options["default"] = self.defaults[dest]
        options["help"] = self.helps.get(dest, options.get("help"))
        self.parser.add_argument(*flags, **options)

    def done(self) -> None:
        if self.unused:  # a programming error: a command overriding a flag that is not there
            raise KeyError(f"no generation flag for {', '.join(sorted(self.unused))}")


def embedded_size() -> str:
    from openldm.config import preset
    from openldm.embedded import EMBEDDED_PRESET

    size = preset(EMBEDDED_PRESET).image_size
    return f"{size}x{size}"


def prompt_flags(flags: Flags, embedded: bool) -> None:
    if embedded:
        from openldm.embedded import EMBEDDED_PROMPT

        prompt = f"(default: {EMBEDDED_PROMPT!r} for the embedded model, {DEFAULT_PROMPT!r} for a --ckpt)"
        flags.add("--prompt", default=None, help=f"the prompt to render {prompt}")
    else:
        flags.add("--prompt", default=DEFAULT_PROMPT, help="the prompt to render (default: %(default)r)")
    flags.add("--negative-prompt", default="", help="what to guide away from (default: none)")


def output_flags(flags: Flags, command: str) -> None:
    flags.add(
        "--outdir",
        default=f"outputs/{command}-samples",
        help="dir to write results to (default: %(default)s)",
    )
    flags.add("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    flags.add("--skip_save", action="store_true", help="do not save individual samples")
    flags.add("--n_rows", type=int, default=0, help="images per row of the grid (default: n_samples)")


def sampling_flags(flags: Flags, *, steps: int, n_iter: int, n_samples: int, scale: str) -> None:
    """Steps, sampler, repeats, batch and guidance; ``scale``: the help text of --scale's default."""
    from openldm.sampling.samplers import SAMPLERS

    flags.add(
        "--ddim_steps",
        "--steps",
        type=int,
        default=steps,
        help="number of sampling steps (default: %(default)s)",
    )
    flags.add("--sampler", help=f"sampler: {', '.join(SAMPLERS)} (default: ddim, as the reference)")
    flags.add("--plms", action="store_true", help="use PLMS sampling (same as --sampler plms)")
    flags.add(
        "--dpm", "--dpm_solver", action="store_true", help="use DPM-Solver++ (same as --sampler dpmpp_2m)"
    )
    flags.add("--karras", action="store_true", help="Karras et al.'s spacing of the noise levels")
    eta = "DDIM eta, or the ancestral samplers' noise (default: the sampler's own, 0 for DDIM: deterministic)"
    flags.add("--ddim_eta", type=float, default=None, help=eta)
    flags.add("--n_iter", type=int, default=n_iter, help="sample this often (default: %(default)s)")
    flags.add(
        "--n_samples",
        type=int,
        default=n_samples,
        help="images per prompt, a.k.a. batch size (default: %(default)s)",
    )
    flags.add("--scale", type=float, default=None, help=f"classifier-free guidance scale (default: {scale})")
    flags.add(
        "--cfg-end",
        type=float,
        default=1.0,
        help="fraction of the steps that are guided; the rest run the prompt's half only, one UNet row "
        "instead of two (e.g. 0.8: the last 20%% of the steps about half as costly; default: 1, all)",
    )
    flags.add(
        "--feature-reuse",
        type=int,
        default=1,
        metavar="N",
        help="run the whole UNet every N-th step and only its outermost blocks between, on the deep "
        "features of the last whole step (DeepCache; e.g. 3; default: 1, every step whole)",
    )
    flags.add(
        "--token-merging",
        type=float,
        default=0.0,
        metavar="RATIO",
        help="merge this fraction of the most similar tokens before each full-resolution self-attention "
        "(ToMe for SD; e.g. 0.5; the web UI's token merging ratio; default: 0, off)",
    )
    flags.add(
        "--vae-tiling",
        choices=("auto", "on", "off"),
        default="auto",
        help="code images by bands of rows in bounded memory, with the whole image's statistics (no seams; "
        "a 2048x2048 decode in under 4 GB): auto when the whole image would take more than half the free "
        "memory (default), on, off",
    )
    flags.add(
        "--seed", type=int, default=42, help="the seed (for reproducible sampling; default: %(default)s)"
    )
    flags.add("--no-weighting", action="store_true", help="read (word:1.3), (word), [word] as plain text")
    flags.add(
        "--clip-skip",
        type=int,
        default=1,
        help="use the text encoder's N-th layer from the end, as the web UI counts it (default: 1, the last)",
    )


def size_flags(flags: Flags, size: str) -> None:
    """--H/--W (``size``: what they default to), the reference's --C/--f, --fixed_code, --from-file."""
    flags.add(
        "--H", type=int, default=None, help=f"image height in pixels, a multiple of 8 (default: {size})"
    )
    flags.add("--W", type=int, default=None, help=f"image width in pixels, a multiple of 8 (default: {size})")
    flags.add("--C", type=int, default=4, help="latent channels (must match the model; default: %(default)s)")
    flags.add(
        "--f", type=int, default=8, help="downsampling factor (must match the model; default: %(default)s)"
    )
    flags.add(
        "--fixed_code", action="store_true", help="use the same starting noise for every repeat (--n_iter)"
    )
    flags.add("--from-file", help="read prompts from this file, one per line")


def model_flags(flags: Flags, embedded: bool, ckpt: str | None = None) -> None:
    """--ckpt (``ckpt``: its help), --config, --precision, --device."""
    if ckpt is None and embedded:
        ckpt = (
            "the model: a .safetensors/.ckpt file or a diffusers folder "
            f"(default: the embedded model, {embedded_size()} images of coloured shapes)"
        )
    flags.add("--ckpt", help=ckpt or "the model, required: a .safetensors/.ckpt file or a diffusers folder")
    flags.add("--config", help="the reference's yaml config of the checkpoint (gives the prediction type)")
    flags.add(
        "--precision",
        choices=PRECISION_CHOICES,
        default="autocast",
        help="autocast: fp16 on a GPU, fp32 on the CPU; full: fp32 (default: %(default)s)",
    )
    flags.add(
        "--fp32-weights",
        action="store_true",
        help="with fp32, hold a fp16 file's weights in fp32 (twice their memory, about 5%% faster per "
        "step on a CPU); by default they stay fp16 and each layer computes in fp32",
    )
    flags.add(
        "--winograd-memory",
        type=float,
        default=None,
        metavar="GB",
        help="on a CPU, memory the UNet's 3x3 convolutions may keep as transformed filters to run by "
        "Winograd's algorithm (a SD 1.5 step at 512: 0.74x the time with 5.7 GB); 0: never (default: "
        "half the free memory with fp32 weights, 0 with fp16 weights kept)",
    )
    flags.add("--device", help="cpu, cuda, cuda:1, mps... (default: cuda, else mps, else cpu)")
    adapter_flags(flags)


def adapter_flags(flags: Flags) -> None:
    """LoRAs, embeddings and another VAE: what users add to a model."""
    flags.add(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:WEIGHT]",
        help="a LoRA or LyCORIS file (kohya/web UI, diffusers/PEFT, LoCon, LoHa, LoKr) applied at WEIGHT "
        "(default 1); repeat for several. Prompts may also say <lora:NAME:WEIGHT> (see --lora-dir)",
    )
    flags.add(
        "--lora-dir",
        action="append",
        default=[],
        help="a folder where the prompts' <lora:NAME:WEIGHT> find NAME.safetensors (repeatable)",
    )
    flags.add(
        "--embedding",
        action="append",
        default=[],
        metavar="PATH",
        help="a textual inversion embedding (.pt, .safetensors, .bin); its file name is the word that "
        "prompts use, as in the web UI: --embedding my-style.pt --prompt 'a cat, my-style'",
    )
    flags.add("--embeddings-dir", help="a folder of embeddings, each usable by its file name")
    flags.add("--vae", help="decode with this VAE: an original or diffusers VAE file (e.g. ft-MSE) or folder")


def hires_flags(flags: Flags) -> None:
    """The web UI's hires fix: generate, upscale, then img2img at the larger size."""
    flags.add(
        "--hires-scale",
        type=float,
        help="hires fix: upscale the first pass by this (e.g. 2) and redraw it at that size (default: off)",
    )
    flags.add("--hires-steps", type=int, help="steps of the second pass (default: --ddim_steps)")
    flags.add(
        "--hires-strength",
        type=float,
        default=0.7,
        help="how much the second pass redraws (default: %(default)s)",
    )
    flags.add(
        "--hires-upscaler",
        choices=["latent", "lanczos"],
        default="latent",
        help="upscale the latents, or the decoded images with Lanczos (default: %(default)s)",
    )


def add_generation_flags(
    parser: argparse.ArgumentParser,
    command: str,
    *,
    defaults: dict[str, Any] | None = None,
    helps: dict[str, str] | None = None,
    embedded: bool = False,
) -> None:
    """txt2img's or img2img's flags (``command``), for them and the commands built on them; ``embedded``:
    the command runs the embedded model without --ckpt."""
    img = command == "img2img"
    low, high = DEFAULT_SCALES[command]
    flags = Flags(parser, defaults, helps)
    prompt_flags(flags, embedded)
    if img:
        flags.add("--init-img", required=True, help="path to the input image")
        strength = (
            "how much of the init image is redrawn, 0..1 (default: %(default)s; SD 2's script used 0.8)"
        )
        flags.add("--strength", type=float, default=0.75, help=strength)
    output_flags(flags, command)
    if not img:
        hires_flags(flags)
    scale = f"{low}, {high} for SD 2 models, as the reference scripts"
    sampling_flags(flags, steps=50, n_iter=1 if img else 3, n_samples=2 if img else 3, scale=scale)
    size_flags(flags, "the init image's size" if img else "the model's image size")
    model_flags(flags, embedded)
    add_control_flags(flags)
    flags.add(
        "--base",
        help="for a UNet-only variant file as --ckpt (openldm train --stage inpaint|depth): the complete "
        "checkpoint it was trained from, whose VAE and text encoder it uses",
    )
    flags.done()
