"""The hires fix: the Lanczos path equals diffusers' txt2img, a Lanczos resize and diffusers' img2img
with the same generator; the latent path upscales the latents bilinearly; the command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from openldm.cli import main
from openldm.images import read_parameters
from openldm.pipelines.options import Hires
from tests.oracles import diffusers_pair

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("single_thread")
PROMPT, NEGATIVE = "a lighthouse at dawn", "blurry"


def test_lanczos_hires_is_txt2img_resize_img2img_as_diffusers(tmp_path) -> None:
    pair = diffusers_pair(tmp_path, "sd1", 64)
    hires = Hires(2.0, steps=6, strength=0.6, upscaler="lanczos")
    ours = pair.model.txt2img(
        PROMPT, NEGATIVE, steps=4, width=64, height=64, seed=5, hires=hires, output_type="np", progress=False
    ).images
    for pipe in (pair.txt2img, pair.img2img):
        pipe.scheduler = diffusers.DDIMScheduler.from_config(
            pipe.scheduler.config, timestep_spacing="leading"
        )
    generator = torch.Generator("cpu").manual_seed(5)
    first = pair.txt2img(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, height=64, width=64, generator=generator,
        output_type="np",
    ).images  # fmt: skip
    # The first passes agree within 1e-3; their 8-bit pictures differ by design (the reference scripts,
    # and openldm, truncate; diffusers rounds), so the second pass starts from ours in both.
    options = {"width": 64, "height": 64, "seed": 5, "progress": False, "steps": 4}
    assert (
        float(np.abs(pair.model.txt2img(PROMPT, NEGATIVE, output_type="np", **options).images - first).max())
        <= 1e-3
    )
    ours_first = pair.model.txt2img(PROMPT, NEGATIVE, **options).images[0]
    theirs = pair.img2img(
        PROMPT, image=ours_first.resize((128, 128), Image.LANCZOS), negative_prompt=NEGATIVE, strength=0.6,
        num_inference_steps=6, generator=generator, output_type="np",
    ).images  # fmt: skip
    err = float(np.abs(ours - theirs).max())
    print(f"hires lanczos: max abs pixel error {err:.2e}")
    assert ours.shape == (1, 128, 128, 3) and err <= 1e-3


def test_latent_hires_upscales_the_latents_and_is_recorded() -> None:
    import openldm

    model = openldm.load()
    options = {"steps": 3, "seed": 2, "progress": False}
    base = model.txt2img("a red circle", output_type="latent", **options).latents
    kept = model.txt2img(
        "a red circle", output_type="latent", hires=Hires(2.0, strength=0.0), **options
    ).latents
    assert torch.equal(kept, F.interpolate(base, scale_factor=2, mode="bilinear", align_corners=False))
    redrawn = model.txt2img("a red circle", hires=Hires(1.5, steps=4, strength=0.5), **options)
    assert redrawn.images[0].size == (96, 96)
    assert (
        "Size: 64x64" in redrawn.parameters[0]
        and "Hires upscale: 1.5, Hires steps: 4" in redrawn.parameters[0]
    )
    with pytest.raises(ValueError, match="the hires fix belongs to txt2img, not img2img"):
        model.img2img("x", Image.new("RGB", (64, 64)), hires=Hires(), **options)


def test_command_line_hires(tmp_path, capsys) -> None:
    argv = ["txt2img", "--prompt", "a red circle", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1"]
    argv += ["--skip_grid", "--outdir", str(tmp_path)]
    assert main([*argv, "--hires-scale", "2", "--hires-upscaler", "lanczos", "--hires-strength", "0.4"]) == 0
    written = next((tmp_path / "samples").iterdir())
    assert Image.open(written).size == (128, 128)
    assert read_parameters(written)["Hires upscaler"] == "Lanczos"
    capsys.readouterr()
    assert main([*argv, "--hires-scale", "9"]) == 2
    assert "--hires-scale must be in (1, 4], got 9.0" in capsys.readouterr().err
