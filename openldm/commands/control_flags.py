"""The ControlNet flags of the generation commands: ``--controlnet PATH --control-image IMG
[--control-preprocess P --control-weight W --control-start S --control-end E --control-mode M]``,
repeatable, and ``--guess-mode`` (mode control for all). The n-th of each list goes with the n-th
ControlNet; a list of one applies to all. Everything is checked and every control image made before the
checkpoint is read."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openldm.control_images import NEEDS_A_MODEL, PREPROCESSORS

if TYPE_CHECKING:
    from openldm.model import StableDiffusion
    from openldm.pipelines.options import Control

PER_CONTROL = ("control_preprocess", "control_weight", "control_start", "control_end", "control_mode")


def add_control_flags(flags: Any) -> None:
    flags.add(
        "--controlnet",
        action="append",
        default=[],
        metavar="PATH",
        help="a ControlNet (ControlNet 1.0/1.1 .pth or .safetensors, a diffusers file or folder) or a "
        "T2I-Adapter (the SD 1.x t2iadapter_*.pth, a diffusers T2IAdapter folder); repeat for several, each "
        "with its --control-image",
    )
    flags.add("--control-image", action="append", default=[], metavar="IMG", help="its control image")
    flags.add(
        "--control-preprocess",
        action="append",
        default=[],
        choices=[*PREPROCESSORS, "depth", *NEEDS_A_MODEL],
        help="make the control image from a picture first: canny edges, scribble, threshold, invert, depth "
        "(MiDaS, with --depth-model) (default: none, the image is the control image)",
    )
    flags.add(
        "--depth-model",
        metavar="PATH",
        help="the MiDaS estimator for --control-preprocess depth: dpt_hybrid-midas-501f0c75.pt, a depth "
        "checkpoint such as 512-depth-ema (its depth_model.*), or a diffusers depth model's folder",
    )
    flags.add("--control-weight", action="append", default=[], type=float, help="its weight (default 1)")
    flags.add(
        "--control-start",
        action="append",
        default=[],
        type=float,
        help="fraction of the steps where it starts",
    )
    flags.add(
        "--control-end", action="append", default=[], type=float, help="... and where it ends (default 1)"
    )
    flags.add(
        "--control-mode",
        action="append",
        default=[],
        choices=["balanced", "prompt", "control"],
        help="the web UI's control modes: balanced (default); prompt ('my prompt is more important': its "
        "guidance ramps from 0.1 at the first block to 1 at the middle); control ('ControlNet is more "
        "important': that ramp, on the prompt's half of guidance only, diffusers' guess mode)",
    )
    flags.add("--guess-mode", action="store_true", help="--control-mode control for every ControlNet")


def _nth(values: list[Any], index: int, default: Any) -> Any:
    if not values:
        return default
    return values[0] if len(values) == 1 else values[index]


def _txt2img_size(args: argparse.Namespace) -> tuple[int, int] | None:
    """txt2img's output (width, height) as far as the flags tell it before the model is read (every
    model's default size is square); None where the size comes from an input image."""
    if args.command != "txt2img" or (args.W is None) != (args.H is None):
        return None
    return (args.W, args.H) if args.W is not None else (1, 1)


def _depth_estimator(args: argparse.Namespace) -> Any:
    from openldm.checkpoints.errors import CheckpointError
    from openldm.checkpoints.extras import read_depth_estimator

    if args.depth_model is None:
        raise ValueError(
            "--control-preprocess depth needs --depth-model PATH (dpt_hybrid-midas-501f0c75.pt or a depth "
            "checkpoint), or give a depth map made elsewhere with --control-preprocess none"
        )
    try:
        return read_depth_estimator(args.depth_model)
    except CheckpointError as e:
        raise ValueError(f"--depth-model: {e}") from None


def control_requests(args: argparse.Namespace) -> list[tuple[str, Control]]:
    """The ControlNets asked for, their images made, without networks yet (checked now: a bad flag is a
    ``ValueError`` naming it). The embedded model has a ControlNet of its own: with no --ckpt, a
    --control-image without --controlnet uses it."""
    from PIL import Image, UnidentifiedImageError

    from openldm.checkpoints.packaged import embedded_controlnet_file
    from openldm.control_images import preprocess
    from openldm.pipelines.control import check_control_aspect
    from openldm.pipelines.depth_estimate import depth_control_image
    from openldm.pipelines.options import Control, OptionError

    paths = list(args.controlnet)
    if args.control_image and not paths:
        if args.ckpt is not None:
            raise ValueError(
                "--control-image needs a --controlnet made for this model (only the embedded one is built in)"
            )
        paths = [str(embedded_controlnet_file())] * len(args.control_image)
    count = len(paths)
    if len(args.control_image) != count:
        raise ValueError(
            f"{count} --controlnet but {len(args.control_image)} --control-image: give one image each"
        )
    for name in PER_CONTROL:
        values = getattr(args, name)
        if len(values) not in (0, 1, count):
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{len(values)} {flag} for {count} --controlnet: give one, or one per ControlNet"
            )
    requests, estimator = [], None
    for index, (path, image_path) in enumerate(zip(paths, args.control_image, strict=True)):
        if not Path(path).exists():
            raise ValueError(f"--controlnet {path!r}: no such file or folder")
        try:
            with Image.open(image_path) as opened:
                picture = opened.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"--control-image {image_path!r} cannot be read ({e})") from None
        if (size := _txt2img_size(args)) is not None:
            check_control_aspect(picture.size, size, index)
        module = _nth(args.control_preprocess, index, "none")
        if module == "depth":
            estimator = estimator or _depth_estimator(args)
            made = depth_control_image(estimator, picture)
        else:
            made = preprocess(picture, module)
        try:
            requests.append(
                (
                    path,
                    Control(
                        None,
                        made,
                        _nth(args.control_weight, index, 1.0),
                        _nth(args.control_start, index, 0.0),
                        _nth(args.control_end, index, 1.0),
                        "control" if args.guess_mode else _nth(args.control_mode, index, "balanced"),
                        module,
                    ),
                )
            )
        except OptionError as e:
            raise ValueError(f"ControlNet {index + 1}: {e}") from None
    return requests


def with_networks(requests: list[tuple[str, Control]], model: StableDiffusion) -> tuple[Control, ...]:
    """The requests with their ControlNets read and fitted to ``model``."""
    return tuple(
        dataclasses.replace(request, network=model.load_controlnet(path)) for path, request in requests
    )
