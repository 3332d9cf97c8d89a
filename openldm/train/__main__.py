"""``python -m openldm.train ...``: the same as ``openldm train ...``."""

from __future__ import annotations

import argparse
import sys

from openldm.train.cli import add_train_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openldm.train")
    commands = parser.add_subparsers(dest="command", required=True)
    add_train_parser(commands)
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
