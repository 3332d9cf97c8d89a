"""What the image commands share: checking the flags before any work, loading the model, building the
one :class:`~openldm.pipelines.options.GenerationOptions` from the flags, running the prompt batches
through the model, and writing the files.

Each command (``txt2img``, ``img2img``, ``inpaint``, ``depth2img``, ``upscale``, ``variations``) reads
top to bottom: check the flags and the output folder, read its inputs, build the options (a bad option
names its flag), load the model, make its :class:`~openldm.pipelines.run.Task`, and hand both to
:meth:`openldm.model.StableDiffusion.generate` once per batch of prompts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openldm.checkpoints.errors import HubUnavailableError
from openldm.commands.control_flags import control_requests, with_networks

if TYPE_CHECKING:  # the pipelines (and torch) are imported when a command runs, not with the parser
    from PIL import Image

    from openldm.model import StableDiffusion
    from openldm.pipelines.options import GenerationOptions, Hires, OptionError, Precision
    from openldm.pipelines.run import Task

DEFAULT_PROMPT = "a painting of a virus monster playing guitar"
# The commands that run an embedded model when no --ckpt is given, and which one (None: the base
# text-to-image model; else its variant). upscale and variations need checkpoints of their own.
EMBEDDED_COMMANDS: dict[str, str | None] = {
    "txt2img": None,
    "img2img": None,
    "inpaint": "inpaint",
    "depth2img": "depth",
}
# The flag of each generation option, for error messages.
OPTION_FLAGS = {
    "steps": "--ddim_steps",
    "guidance_scale": "--scale",
    "width": "--W",
    "height": "--H",
    "sampler": "--sampler",
    "eta": "--ddim_eta",
    "seed": "--seed",
    "n_samples": "--n_samples",
    "n_iter": "--n_iter",
    "precision": "--precision",
    "prompt": "--prompt",
    "negative_prompt": "--negative-prompt",
    "clip_skip": "--clip-skip",
    "cfg_end": "--cfg-end",
    "feature_reuse": "--feature-reuse",
    "token_merging": "--token-merging",
    "vae_tiling": "--vae-tiling",
}
_OPTION_WORDS = {"guidance_scale": "guidance scale"}


class UsageError(ValueError):
    """Bad command-line input: reported on one line, exit status 2."""


# --- checks before any work --------------------------------------------------------------------


def sampler_name(args: argparse.Namespace) -> str:
    """--sampler wins; else --dpm / --plms as in the reference; else DDIM, the reference's default."""
    if args.sampler is not None:
        return str(args.sampler)
    if args.dpm:
        return "dpmpp_2m"
    return "plms" if args.plms else "ddim"


def check_input(args: argparse.Namespace) -> None:
    """What the flags say that can be checked before the checkpoint is read (the generation options
    themselves are checked when :func:`generation_options` builds them)."""
    for flag, value in (("--H", args.H), ("--W", args.W)):
        if value is not None and (value <= 0 or value % args.f):
            raise UsageError(f"{flag} must be a positive multiple of {args.f}, got {value}")
    if hasattr(args, "strength") and not 0.0 <= args.strength <= 1.0:
        raise UsageError(f"--strength must be between 0 and 1, got {args.strength}")
    if args.from_file is not None and not Path(args.from_file).is_file():
        raise UsageError(f"--from-file {args.from_file!r} does not exist")
    check_model_flags(args)
    check_outputs(args)


def check_model_flags(args: argparse.Namespace) -> None:
    """--ckpt, --base, --config and --device go together, and the device exists."""
    if args.ckpt is None and args.command not in EMBEDDED_COMMANDS:
        raise UsageError(
            f"{args.command} needs --ckpt: the embedded models run {', '.join(EMBEDDED_COMMANDS)} only; "
            "pass --ckpt path/to/model.safetensors (or a diffusers folder)"
        )
    if args.ckpt is None and getattr(args, "base", None) is not None:
        raise UsageError("--base goes with a UNet-only variant file given as --ckpt; pass --ckpt too")
    if args.ckpt is None and args.config is not None:
        raise UsageError("--config describes the checkpoint of --ckpt; pass --ckpt too (or no --config)")
    device_name(args.device)
    gigabytes = getattr(args, "winograd_memory", None)
    if gigabytes is not None and not gigabytes >= 0:
        raise UsageError(f"--winograd-memory {gigabytes:g} is not a size; give the GB to keep, or 0 for none")
    check_adapter_flags(args)


def check_adapter_flags(args: argparse.Namespace) -> None:
    """The files and folders of --lora, --lora-dir, --embedding, --embeddings-dir and --vae exist."""
    for value in args.lora:
        lora_flag(value)
    files = [("--embedding", p) for p in args.embedding] + ([("--vae", args.vae)] if args.vae else [])
    for flag, path in files:
        if not Path(path).exists():
            raise UsageError(f"{flag} {path!r}: no such file")
    folders = [("--lora-dir", p) for p in args.lora_dir]
    folders += [("--embeddings-dir", args.embeddings_dir)] if args.embeddings_dir else []
    for flag, path in folders:
        if not Path(path).is_dir():
            raise UsageError(f"{flag} {path!r} is not a folder")


def lora_flag(value: str) -> tuple[Path, float]:
    """``PATH[:WEIGHT]`` -> (path, weight); the weight is what follows the last colon if it is a number."""
    path, _, weight = value.rpartition(":")
    try:
        parsed = float(weight) if path else None
    except ValueError:
        parsed = None
    if parsed is None:
        path, parsed = value, 1.0
    if not Path(path).is_file():
        raise UsageError(
            f"--lora {value!r}: no such file {path!r}; give PATH or PATH:WEIGHT (e.g. style.safetensors:0.8)"
        )
    return Path(path), parsed


def add_adapters(args: argparse.Namespace, model: StableDiffusion) -> None:
    """Apply the adapter flags to a loaded model: VAE, LoRA folders, LoRAs, embeddings."""
    if args.vae:
        model.load_vae(args.vae)
    for folder in args.lora_dir:
        model.add_lora_dir(folder)
    for value in args.lora:
        path, weight = lora_flag(value)
        model.load_lora(path, weight)
    from openldm.adapters.embeddings import embedding_files

    embeddings = [Path(p) for p in args.embedding]
    embeddings += embedding_files(args.embeddings_dir) if args.embeddings_dir else []
    for path in embeddings:
        model.load_embedding(path)


def check_outputs(args: argparse.Namespace) -> None:
    """The output folders, proven writable before anything is loaded or computed (nothing is created)."""
    from openldm.commands.outputs import check_image_outputs

    check_image_outputs(args.outdir, save_samples=not args.skip_save)


def device_name(name: str | None) -> str:
    """The --device asked for (default: CUDA, else MPS, else the CPU), checked to exist here."""
    from openldm.devices import resolve_device

    return str(resolve_device(name))


def precision_of(flag: str, device: str) -> Precision:
    """The reference's ``autocast`` means fp16 on a GPU; on the CPU it runs in full precision."""
    if flag == "autocast":
        return "fp32" if device == "cpu" else "fp16"
    return "fp32" if flag == "full" else flag  # type: ignore[return-value]


def precision_for(args: argparse.Namespace) -> Precision:
    """The precision --precision asks for on --device (commands without the flag: ``autocast``)."""
    return precision_of(getattr(args, "precision", "autocast"), device_name(args.device))


def prompt_batches(args: argparse.Namespace) -> list[list[str]]:
    """One batch of the prompt (or the model's default prompt); or the file's non-empty lines,
    ``n_samples`` prompts per batch."""
    if args.from_file is None:
        return [[default_prompt(args)]]
    try:
        lines = Path(args.from_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read --from-file {args.from_file!r} ({e})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UsageError(f"--from-file {args.from_file!r} holds no prompts (one per line)")
    return [prompts[i : i + args.n_samples] for i in range(0, len(prompts), args.n_samples)]


def default_prompt(args: argparse.Namespace) -> str:
    """--prompt, else a prompt the model can draw: the reference's for a checkpoint, a shapes prompt for
    the embedded model."""
    from openldm.embedded import EMBEDDED_PROMPT

    if args.prompt is not None:
        return str(args.prompt)
    return DEFAULT_PROMPT if args.ckpt is not None else EMBEDDED_PROMPT


# --- options and model -------------------------------------------------------------------------


def generation_options(
    args: argparse.Namespace, prompts: list[str], guidance_scale: float
) -> GenerationOptions:
    """The options the shared generation flags ask for; a bad one is a :class:`UsageError` naming its
    flag."""
    from openldm.pipelines.options import GenerationOptions, OptionError

    precision = precision_for(args)
    values: dict[str, Any] = {
        "steps": args.ddim_steps,
        "guidance_scale": guidance_scale,
        "width": getattr(args, "W", None),
        "height": getattr(args, "H", None),
        "sampler": sampler_name(args),
        "eta": args.ddim_eta,
        "karras": args.karras,
        "seed": args.seed,
        "n_samples": args.n_samples,
        "n_iter": args.n_iter,
        "fixed_code": getattr(args, "fixed_code", False),
        "weighting": not args.no_weighting,
        "precision": precision,
        "clip_skip": args.clip_skip,
        "cfg_end": args.cfg_end,
        "feature_reuse": args.feature_reuse,
        "token_merging": args.token_merging,
        "vae_tiling": args.vae_tiling,
        "hires": hires_option(args),
    }
    try:
        return GenerationOptions(prompts, args.negative_prompt, **values)
    except OptionError as e:
        raise UsageError(flag_message(e)) from None


def hires_option(args: argparse.Namespace) -> Hires | None:
    """The hires fix the --hires-* flags ask for (None without --hires-scale)."""
    from openldm.pipelines.options import Hires, OptionError

    if getattr(args, "hires_scale", None) is None:
        return None
    try:
        return Hires(args.hires_scale, args.hires_steps, args.hires_strength, args.hires_upscaler)
    except OptionError as e:
        raise UsageError(f"--{str(e).replace(' ', '-', 1)}") from None


def flag_message(error: OptionError) -> str:
    """An option's error in the command line's words: its flag where the message names the option."""
    message, flag = str(error), OPTION_FLAGS.get(error.field)
    word = _OPTION_WORDS.get(error.field, error.field)
    if flag is not None and message.startswith(word + " "):
        return flag + message[len(word) :]
    return message


def load_model(args: argparse.Namespace, kind: str | None = None) -> StableDiffusion:
    """The model of --ckpt (with --config, --base), else the embedded model of the command (or
    ``kind``), on --device, computing in float32 when the precision is fp32."""
    import torch

    from openldm.model import load, load_embedded

    device = device_name(args.device)
    # fp32: half-precision weights stay so in memory, each layer computing in fp32 (the same images),
    # unless --fp32-weights asks for them upcast once (more memory, a little faster)
    fp32 = torch.float32 if precision_for(args) == "fp32" else None
    weights: dict[str, Any] = {"dtype" if getattr(args, "fp32_weights", False) else "compute_dtype": fp32}
    if getattr(args, "winograd_memory", None) is not None:
        weights["winograd_memory"] = int(args.winograd_memory * 2**30)
    if args.ckpt is None:
        model = load_embedded(kind or EMBEDDED_COMMANDS.get(args.command), device=device, **weights)
    else:
        try:
            model = load(
                args.ckpt,
                config=args.config,
                device=device,
                **weights,
                base=getattr(args, "base", None),
            )
        except HubUnavailableError as e:
            raise UsageError(hub_error(args.ckpt, e)) from None
    add_adapters(args, model)
    return model


def hub_error(flag_value: str, error: HubUnavailableError, flag: str = "--ckpt") -> str:
    """A hub id that cannot be fetched, in the command line's words."""
    return (
        f"{flag} {flag_value!r} is not a file or folder here, and it cannot be fetched from the Hugging "
        f"Face hub ({error.reason}); download the model's diffusers folder ({error.FOLDER_PARTS}) and "
        f"pass its path: {flag} path/to/folder"
    )


def check_model(args: argparse.Namespace, model: StableDiffusion) -> None:
    """--C and --f describe the model (its variant is checked when it runs)."""
    spec = model.spec
    if args.C != spec.vae.embed_dim:
        raise UsageError(f"--C {args.C} does not match the model's {spec.vae.embed_dim} latent channels")
    if args.f != spec.vae.downsampling_factor:
        raise UsageError(
            f"--f {args.f} does not match the model's downsampling factor {spec.vae.downsampling_factor}"
        )


# --- running and writing -----------------------------------------------------------------------


def run_generation(
    args: argparse.Namespace, make_task: Callable[[], Task], scale: Callable[[str], float]
) -> int:
    """A generation command from its flags to its files: check the flags and the output folder, build
    the options, make the task (it reads its inputs), load the model, run every batch, write.
    ``scale(variant)``: the guidance scale when --scale is not given (SD 2's scripts use another)."""
    check_input(args)
    batches = prompt_batches(args)
    options = generation_options(args, batches[0], args.scale if args.scale is not None else scale(""))
    try:
        controls = control_requests(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    task = make_task()
    model = load_model(args)
    check_model(args, model)
    if controls:
        options = options.replace(controls=with_networks(controls, model))
    if args.scale is None and scale(model.spec.variant) != options.guidance_scale:
        options = options.replace(guidance_scale=scale(model.spec.variant))
    save_outputs(args, run_batches(args, model, task, options, batches))
    return 0


def run_batches(
    args: argparse.Namespace,
    model: StableDiffusion,
    task: Task,
    options: GenerationOptions,
    batches: list[list[str]],
) -> list[Image.Image]:
    """Every batch of :func:`prompt_batches` through ``model.generate``: the prompt gets ``n_samples``
    images; a file's batch of up to ``n_samples`` prompts gets one image each."""
    n_samples = args.n_samples if args.from_file is None else 1
    images: list[Image.Image] = []
    for prompts in batches:
        batch = options.replace(prompt=prompts, negative_prompt=args.negative_prompt, n_samples=n_samples)
        images += model.generate(task, batch).images
    return images


def save_outputs(args: argparse.Namespace, images: list[Image.Image]) -> None:
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
