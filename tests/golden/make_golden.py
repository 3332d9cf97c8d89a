"""Regenerate the golden image of the embedded model: run by hand when its weights change.

    python tests/golden/make_golden.py

It writes ``tests/golden/embedded_txt2img.png``: one txt2img image of :data:`PROMPT` by the packaged
model in float32 on the CPU with one thread, which ``tests/test_embedded.py`` compares against.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

GOLDEN_FILE = Path(__file__).parent / "embedded_txt2img.png"
PROMPT = "a red circle in the centre on a blue background"
SETTINGS: dict[str, Any] = {"seed": 0, "sampler": "ddim", "steps": 20, "guidance_scale": 7.5}


def golden_image() -> Image.Image:
    """The image the golden file holds, generated now."""
    import torch

    import openldm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the summation order of a single-core CI machine
    try:
        model = openldm.load(dtype=torch.float32)
        return model.txt2img(PROMPT, progress=False, **SETTINGS).images[0]
    finally:
        torch.set_num_threads(threads)


def main() -> int:
    from openldm.images import save_png

    path = save_png(golden_image(), GOLDEN_FILE)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
