"""The ``openldm`` command line: a thin layer over the Python API.

``txt2img`` and ``img2img`` accept the reference scripts' flags (``scripts/txt2img.py`` and
``scripts/img2img.py`` of the Stable Diffusion repositories) with their defaults, and write what they
write: ``OUTDIR/samples/00000.png``, ... (numbered on from the files already there) and a grid
``OUTDIR/grid-0000.png``; each PNG carries its generation parameters as the popular web UI writes them.
Without ``--ckpt`` they run the embedded default model (:mod:`openldm.embedded`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from openldm.checkpoints.errors import CheckpointError, HubUnavailableError
from openldm.train.cli import add_train_parser

if TYPE_CHECKING:
    from collections.abc import Callable

    from PIL import Image

    from openldm.checkpoints.load import StableDiffusion
    from openldm.pipelines.common import Generation

DEFAULT_PROMPT = "a painting of a virus monster playing guitar"
# The commands that run an embedded model when no --ckpt is given, and which one (None: the base
# text-to-image model; else its variant). upscale and variations need checkpoints of their own.
EMBEDDED_COMMANDS: dict[str, str | None] = {
    "txt2img": None,
    "img2img": None,
    "inpaint": "inpaint",
    "depth2img": "depth",
}
# Guidance scale defaults of the reference scripts: SD 1's, and SD 2's (for SD 2 models).
DEFAULT_SCALES = {"txt2img": (7.5, 9.0), "img2img": (5.0, 9.0)}


class UsageError(ValueError):
    """Bad command-line input: reported on one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``openldm: error: ...``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"openldm: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


# --- inspect -----------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> int:
    from openldm.checkpoints.load import describe, load

    model = load(args.checkpoint, config=args.config, prediction_type=args.prediction_type)
    print(describe(model))
    return 0


# --- txt2img / img2img -------------------------------------------------------------------------


def _sampler_name(args: argparse.Namespace) -> str:
    """--sampler wins; else --dpm / --plms as in the reference; else DDIM, the reference's default."""
    from openldm.sampling.samplers import SAMPLERS

    if args.sampler is not None:
        name = args.sampler
    elif args.dpm:
        name = "dpmpp_2m"
    elif args.plms:
        name = "plms"
    else:
        name = "ddim"
    if name not in SAMPLERS:
        raise UsageError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return name


def _check_input(args: argparse.Namespace) -> None:
    """Everything that can be checked before the checkpoint is read."""
    for flag, value in (("--H", args.H), ("--W", args.W)):
        if value is not None and (value <= 0 or value % 8):
            raise UsageError(f"{flag} must be a positive multiple of 8, got {value}")
    for flag, value in (
        ("--ddim_steps", args.ddim_steps),
        ("--n_samples", args.n_samples),
        ("--n_iter", args.n_iter),
    ):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.scale is not None and args.scale < 0:
        raise UsageError(f"--scale must be >= 0, got {args.scale}")
    if args.ddim_eta is not None and args.ddim_eta < 0:
        raise UsageError(f"--ddim_eta must be >= 0, got {args.ddim_eta}")
    if args.command == "img2img" and not 0.0 <= args.strength <= 1.0:
        raise UsageError(f"--strength must be between 0 and 1, got {args.strength}")
    if args.from_file is not None and not Path(args.from_file).is_file():
        raise UsageError(f"--from-file {args.from_file!r} does not exist")
    if args.ckpt is None and args.command not in EMBEDDED_COMMANDS:
        raise UsageError(
            f"{args.command} needs --ckpt: the embedded models run {', '.join(EMBEDDED_COMMANDS)} only; "
            "pass --ckpt path/to/model.safetensors (or a diffusers folder)"
        )
    if args.ckpt is None and getattr(args, "base", None) is not None:
        raise UsageError("--base goes with a UNet-only variant file given as --ckpt; pass --ckpt too")
    if args.ckpt is None and args.config is not None:
        raise UsageError("--config describes the checkpoint of --ckpt; pass --ckpt too (or no --config)")
    _check_outputs(args)
    _device(args.device)


def _check_outputs(args: argparse.Namespace) -> None:
    """The output folders, created and proven writable before anything is loaded or computed."""
    from openldm.commands.outputs import check_image_outputs

    check_image_outputs(args.outdir, save_samples=not args.skip_save)


def _device(name: str | None) -> str:
    """The --device asked for (default: CUDA, else MPS, else the CPU), checked to exist here."""
    from openldm.devices import resolve_device

    return str(resolve_device(name))


def _precision(flag: str, device: str) -> str:
    """The reference's ``autocast`` means fp16 on a GPU; on the CPU it runs in full precision."""
    if flag == "autocast":
        return "fp32" if device == "cpu" else "fp16"
    return "fp32" if flag == "full" else flag


def _prompt_batches(args: argparse.Namespace) -> list[list[str]]:
    """One batch of the prompt (or the model's default prompt); or the file's non-empty lines,
    ``n_samples`` prompts per batch."""
    if args.from_file is None:
        return [[_default_prompt(args)]]
    try:
        lines = Path(args.from_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read --from-file {args.from_file!r} ({e})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UsageError(f"--from-file {args.from_file!r} holds no prompts (one per line)")
    return [prompts[i : i + args.n_samples] for i in range(0, len(prompts), args.n_samples)]


def _check_model(args: argparse.Namespace, model: StableDiffusion) -> None:
    spec = model.spec
    if args.C != spec.vae.embed_dim:
        raise UsageError(f"--C {args.C} does not match the model's {spec.vae.embed_dim} latent channels")
    if args.f != spec.vae.downsampling_factor:
        raise UsageError(
            f"--f {args.f} does not match the model's downsampling factor {spec.vae.downsampling_factor}"
        )


def _save_outputs(args: argparse.Namespace, images: list[Image.Image]) -> None:
    """The samples and the grid, written whole or not at all (see :mod:`openldm.commands.outputs`)."""
    from openldm.commands.outputs import write_outputs

    rows = args.n_rows if args.n_rows > 0 else args.n_samples
    written = write_outputs(
        args.outdir, images, save_samples=not args.skip_save, grid_rows=None if args.skip_grid else rows
    )
    samples = [path for path in written if path.parent.name == "samples"]
    if samples:
        print(f"openldm: wrote {len(samples)} images to {samples[0].parent}", file=sys.stderr)
    for path in written[len(samples) :]:
        print(f"openldm: wrote {path}", file=sys.stderr)


def _load_model(args: argparse.Namespace) -> tuple[StableDiffusion, str]:
    """(model, precision) as --ckpt (default: the embedded model), --config, --device and --precision ask."""
    import torch

    from openldm.checkpoints.load import load
    from openldm.embedded import load_embedded

    device = _device(args.device)
    precision = _precision(args.precision, device)
    dtype = torch.float32 if precision == "fp32" else None
    if args.ckpt is None:
        return load_embedded(EMBEDDED_COMMANDS[args.command], device=device, dtype=dtype), precision
    base = getattr(args, "base", None)
    try:
        return load(args.ckpt, config=args.config, device=device, dtype=dtype, base=base), precision
    except HubUnavailableError as e:
        raise UsageError(hub_error(args.ckpt, e)) from None


def hub_error(flag_value: str, error: HubUnavailableError, flag: str = "--ckpt") -> str:
    """A hub id that cannot be fetched, in the command line's words."""
    return (
        f"{flag} {flag_value!r} is not a file or folder here, and it cannot be fetched from the Hugging "
        f"Face hub ({error.reason}); download the model's diffusers folder ({error.FOLDER_PARTS}) and "
        f"pass its path: {flag} path/to/folder"
    )


def _generation_options(args: argparse.Namespace, sampler: str, precision: str) -> dict[str, Any]:
    """The pipeline options of the shared generation flags (the guidance scale is each command's)."""
    return {
        "steps": args.ddim_steps,
        "width": args.W,
        "height": args.H,
        "sampler": sampler,
        "seed": args.seed,
        "n_iter": args.n_iter,
        "eta": args.ddim_eta,
        "karras": args.karras,
        "weighting": not args.no_weighting,
        "precision": precision,
        "fixed_code": args.fixed_code,
    }


def _generate_batches(
    args: argparse.Namespace, batches: list[list[str]], generate: Callable[[list[str], int], Generation]
) -> list[Image.Image]:
    """``generate(prompts, n_samples)`` for every batch of :func:`_prompt_batches`; all their images."""
    images: list[Image.Image] = []
    for prompts in batches:
        # The prompt: n_samples images of it; a file: a batch of up to n_samples prompts, one image each.
        n_samples = args.n_samples if args.from_file is None else 1
        images += generate(prompts, n_samples).images
    return images


def _default_prompt(args: argparse.Namespace) -> str:
    """--prompt, else a prompt the model can draw: the reference's for a checkpoint, a shapes prompt for
    the embedded model."""
    from openldm.embedded import EMBEDDED_PROMPT

    if args.prompt is not None:
        return args.prompt
    return DEFAULT_PROMPT if args.ckpt is not None else EMBEDDED_PROMPT


def _generate(args: argparse.Namespace) -> int:
    from openldm.images import load_image

    sampler = _sampler_name(args)
    _check_input(args)
    batches = _prompt_batches(args)
    init_image = load_image(args.init_img, "--init-img") if args.command == "img2img" else None
    model, precision = _load_model(args)
    _check_model(args, model)
    low, high = DEFAULT_SCALES[args.command]
    options = _generation_options(args, sampler, precision)
    options["guidance_scale"] = (
        args.scale if args.scale is not None else (high if model.spec.variant == "sd2" else low)
    )
    if args.command == "img2img":
        options["strength"] = args.strength

    def generate(prompts: list[str], n_samples: int) -> Generation:
        if args.command == "txt2img":
            return model.txt2img(prompts, args.negative_prompt, n_samples=n_samples, **options)
        return model.img2img(prompts, init_image, args.negative_prompt, n_samples=n_samples, **options)

    _save_outputs(args, _generate_batches(args, batches, generate))
    return 0


# --- parser ------------------------------------------------------------------------------------

_EXAMPLES = {
    "txt2img": """examples:
  openldm txt2img --prompt "two green squares and a yellow triangle on a black background"
  openldm txt2img --ckpt v1-5-pruned-emaonly.safetensors --prompt "an astronaut riding a horse"
  openldm txt2img --ckpt v2-1_768-ema-pruned.safetensors --config v2-inference-v.yaml \\
      --prompt "a lighthouse at dawn" --negative-prompt "blurry" --H 768 --W 768 --n_samples 1 --n_iter 1
  openldm txt2img --ckpt model.safetensors --from-file prompts.txt --sampler dpmpp_2m --karras --ddim_steps 25
  openldm txt2img --ckpt model.safetensors --prompt "a (red:1.3) fox in [fog]" --seed 7 --skip_grid

Without --ckpt the embedded default model runs: a small model trained on simple coloured shapes
(circles, squares, triangles, rectangles; red, green, blue, yellow, pink...) that draws {size} images
in seconds on a CPU.

Every PNG carries its parameters (prompt, negative prompt, steps, sampler, CFG scale, seed, size, model)
in a "parameters" text chunk, as the popular web UI writes it. The same seed gives the same image on
every device: the noise is drawn on the CPU.""",
    "img2img": """examples:
  openldm img2img --init-img shapes.png --prompt "a blue square on a white background" --strength 0.6
  openldm img2img --ckpt v1-5-pruned-emaonly.safetensors --init-img sketch.png \\
      --prompt "a fantasy landscape, trending on artstation" --strength 0.75
  openldm img2img --ckpt model.safetensors --init-img photo.jpg --prompt "an oil painting" \\
      --strength 0.5 --sampler euler_a --ddim_steps 30 --n_samples 1

--strength 0 returns the init image (through the VAE), 1 redraws it entirely; int(strength * steps)
steps run. The init image is resized down to a multiple of 8 per side (the reference script: 64)
unless --H/--W ask for a size.""",
}


def _add_generation_flags(
    parser: argparse.ArgumentParser,
    command: str,
    *,
    defaults: dict[str, Any] | None = None,
    helps: dict[str, str] | None = None,
    embedded: bool = False,
) -> None:
    """txt2img's or img2img's flags (``command``); ``defaults`` / ``helps`` (by dest: ``strength``,
    ``outdir``, ``scale``, ``n_samples``...) replace a flag's default and help text for another command.
    ``embedded``: the command runs the embedded model without --ckpt (see :data:`EMBEDDED_COMMANDS`)."""
    from openldm.embedded import EMBEDDED_PROMPT
    from openldm.sampling.samplers import SAMPLERS

    img = command == "img2img"
    low, high = DEFAULT_SCALES[command]
    defaults, helps = defaults or {}, helps or {}
    unused = set(defaults) | set(helps)

    def add(*flags: str, **options: Any) -> None:
        dest = flags[0].lstrip("-").replace("-", "_")
        unused.discard(dest)
        if dest in defaults:
            options["default"] = defaults[dest]
        options["help"] = helps.get(dest, options.get("help"))
        parser.add_argument(*flags, **options)

    if embedded:
        add(
            "--prompt",
            default=None,
            help=f"the prompt to render (default: {EMBEDDED_PROMPT!r} for the embedded model, "
            f"{DEFAULT_PROMPT!r} for a --ckpt)",
        )
    else:
        add("--prompt", default=DEFAULT_PROMPT, help="the prompt to render (default: %(default)r)")
    add("--negative-prompt", default="", help="what to guide away from (default: none)")
    if img:
        add("--init-img", required=True, help="path to the input image")
        add(
            "--strength",
            type=float,
            default=0.75,
            help="how much of the init image is redrawn, 0..1 (default: %(default)s; SD 2's script used 0.8)",
        )
    add(
        "--outdir",
        default=f"outputs/{command}-samples",
        help="dir to write results to (default: %(default)s)",
    )
    add("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    add("--skip_save", action="store_true", help="do not save individual samples")
    add(
        "--ddim_steps",
        "--steps",
        type=int,
        default=50,
        help="number of sampling steps (default: %(default)s)",
    )
    add("--sampler", help=f"sampler: {', '.join(SAMPLERS)} (default: ddim, as the reference)")
    add("--plms", action="store_true", help="use PLMS sampling (same as --sampler plms)")
    add("--dpm", "--dpm_solver", action="store_true", help="use DPM-Solver++ (same as --sampler dpmpp_2m)")
    add("--karras", action="store_true", help="Karras et al.'s spacing of the noise levels")
    add("--fixed_code", action="store_true", help="use the same starting noise for every repeat (--n_iter)")
    add(
        "--ddim_eta",
        type=float,
        default=None,
        help="DDIM eta, or the ancestral samplers' noise "
        "(default: the sampler's own, 0 for DDIM: deterministic)",
    )
    add("--n_iter", type=int, default=1 if img else 3, help="sample this often (default: %(default)s)")
    size = "the init image's size" if img else "the model's image size"
    add(
        "--H",
        type=int,
        default=None,
        help=f"image height in pixels, a multiple of 8 (default: {size})",
    )
    add(
        "--W",
        type=int,
        default=None,
        help=f"image width in pixels, a multiple of 8 (default: {size})",
    )
    add("--C", type=int, default=4, help="latent channels (must match the model; default: %(default)s)")
    add("--f", type=int, default=8, help="downsampling factor (must match the model; default: %(default)s)")
    add(
        "--n_samples",
        type=int,
        default=2 if img else 3,
        help="images per prompt, a.k.a. batch size (default: %(default)s)",
    )
    add("--n_rows", type=int, default=0, help="images per row of the grid (default: n_samples)")
    add(
        "--scale",
        type=float,
        default=None,
        help="classifier-free guidance scale "
        f"(default: {low}, {high} for SD 2 models, as the reference scripts)",
    )
    add("--from-file", help="read prompts from this file, one per line")
    if embedded:
        add(
            "--ckpt",
            help="the model: a .safetensors/.ckpt file or a diffusers folder "
            f"(default: the embedded model, {_embedded_size()} images of coloured shapes)",
        )
    else:
        add("--ckpt", help="the model, required: a .safetensors/.ckpt file or a diffusers folder")
    add("--config", help="the reference's yaml config of the checkpoint (gives the prediction type)")
    add(
        "--base",
        help="for a UNet-only variant file as --ckpt (openldm train --stage inpaint|depth): the complete "
        "checkpoint it was trained from, whose VAE and text encoder it uses",
    )
    add("--seed", type=int, default=42, help="the seed (for reproducible sampling; default: %(default)s)")
    add(
        "--precision",
        choices=["autocast", "full", "fp32", "fp16", "bf16"],
        default="autocast",
        help="autocast: fp16 on a GPU, fp32 on the CPU; full: fp32 (default: %(default)s)",
    )
    add("--device", help="cpu, cuda, cuda:1, mps... (default: cuda, else mps, else cpu)")
    add("--no-weighting", action="store_true", help="read (word:1.3), (word), [word] as plain text")
    if unused:  # a programming error: a command overriding a flag that is not there
        raise KeyError(f"no generation flag for {', '.join(sorted(unused))}")
    parser.set_defaults(run=_generate)


def _embedded_size() -> str:
    from openldm.config import preset
    from openldm.embedded import EMBEDDED_PRESET

    size = preset(EMBEDDED_PRESET).image_size
    return f"{size}x{size}"


# The rest of the family's commands: openldm/commands/<name>.py, each with add_parser and run.
FAMILY_COMMANDS: tuple[str, ...] = ("inpaint", "depth2img", "upscale", "variations", "eval")


THREADS_HELP = (
    "CPU threads for torch (default: torch's, one per core: the fastest on an idle machine, e.g. 0.86 s "
    "against 1.11 s for 3 images of the embedded model on 2 cores; on a CPU that other busy processes "
    "share, 1 can be many times faster)"
)


def _version() -> str:
    from importlib import metadata

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"openldm {version('openldm')} (torch {version('torch')}, Python {sys.version.split()[0]})"


def _apply_threads(args: argparse.Namespace) -> None:
    """--threads, which every command takes: checked, then given to torch before any work."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="openldm",
        description="Stable Diffusion, exact and open. Each command has its own --help.",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the loader decides")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect",
        help="load a checkpoint and describe it",
        description="Load a checkpoint offline and print its variant, sizes, prediction type and dtype. "
        "Example: openldm inspect v2-1_768-ema-pruned.safetensors --config v2-inference-v.yaml",
    )
    inspect.add_argument("checkpoint", help="a .safetensors/.ckpt file, a diffusers folder or a hub id")
    inspect.add_argument("--config", help="the reference's yaml config (gives the prediction type)")
    inspect.add_argument("--prediction-type", choices=["eps", "v"], help="override the prediction type")
    inspect.set_defaults(run=_inspect)

    descriptions = {
        "txt2img": "Generate images from a text prompt (the reference's scripts/txt2img.py flags).",
        "img2img": "Redraw an image after a text prompt (the reference's scripts/img2img.py flags).",
    }
    for command, description in descriptions.items():
        sub = commands.add_parser(
            command,
            help=description.split(" (")[0].lower(),
            description=description,
            epilog=_EXAMPLES[command].replace("{size}", _embedded_size()),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_generation_flags(sub, command, embedded=command in EMBEDDED_COMMANDS)
    for name in FAMILY_COMMANDS:
        importlib.import_module(f"openldm.commands.{name}").add_parser(commands)
    add_train_parser(commands)
    for sub in commands.choices.values():
        sub.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; return the exit status (2 for bad input, 1 for a failed generation)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed on one line
        return exit_.code if isinstance(exit_.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        _apply_threads(args)
        return args.run(args)
    # FileExistsError: a training run that would overwrite another without --resume.
    except (CheckpointError, ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"openldm: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        from openldm.pipelines.common import NonFiniteOutputError

        if not isinstance(error, NonFiniteOutputError):
            raise
        print(f"openldm: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
