"""The ``openldm`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import logging
import sys

from openldm.checkpoints.errors import CheckpointError


def _inspect(args: argparse.Namespace) -> int:
    from openldm.checkpoints.load import describe, load

    model = load(args.checkpoint, config=args.config, prediction_type=args.prediction_type)
    print(describe(model))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openldm",
        description="Stable Diffusion, exact and open. Each command has its own --help.",
    )
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.run(args)
    except (CheckpointError, ValueError, FileNotFoundError) as error:
        print(f"openldm: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
