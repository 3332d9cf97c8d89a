"""The ``openldm`` command line: a thin layer over the Python API.

Each command lives in :mod:`openldm.commands` (``txt2img`` and ``img2img`` in
:mod:`~openldm.commands.text_image`, the family's in modules of their own, ``train`` in
:mod:`openldm.train.cli`) and shares :mod:`openldm.commands.common`; this module builds the parser, sets
``--threads``, and turns errors into one line and an exit status.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn

from openldm.checkpoints.errors import CheckpointError
from openldm.commands.common import UsageError
from openldm.commands.text_image import add_parsers as add_text_image_parsers
from openldm.train.cli import add_train_parser

# The rest of the family's commands: openldm/commands/<name>.py, each with add_parser and run.
FAMILY_COMMANDS: tuple[str, ...] = ("inpaint", "depth2img", "upscale", "variations", "eval", "merge")
THREADS_HELP = (
    "CPU threads for torch (default: torch's, one per core: the fastest on an idle machine, e.g. 0.86 s "
    "against 1.11 s for 3 images of the embedded model on 2 cores; on a CPU that other busy processes "
    "share, 1 can be many times faster)"
)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``openldm: error: ...``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"openldm: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _inspect(args: argparse.Namespace) -> int:
    from openldm.model import describe, load

    model = load(args.checkpoint, config=args.config, prediction_type=args.prediction_type)
    print(describe(model))
    return 0


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
    add_text_image_parsers(commands)
    for name in FAMILY_COMMANDS:
        importlib.import_module(f"openldm.commands.{name}").add_parser(commands)
    importlib.import_module("openldm.server.command").add_parser(commands)
    importlib.import_module("openldm.train.finetune_command").add_parser(commands)
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
