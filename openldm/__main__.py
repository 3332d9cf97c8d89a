"""``python -m openldm ...``: the same as the ``openldm`` command (for environments without its script)."""

from __future__ import annotations

import sys

from openldm.cli import main

if __name__ == "__main__":
    sys.exit(main())
