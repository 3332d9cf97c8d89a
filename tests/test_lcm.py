"""The LCM sampler (``openldm.sampling.lcm``) against diffusers' ``LCMScheduler``: the same timesteps
for every step count, and the same images from the same generator (txt2img on the tiny SD 1, without
and with guidance; max abs pixel error, 1e-3 allowed as in the pipeline tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openldm.sampling.lcm import ORIGINAL_STEPS, boundary_scalings, lcm_timesteps
from openldm.sampling.samplers import get_sampler
from openldm.sampling.schedule import NoiseSchedule
from tests.oracles import diffusers_pair

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("single_thread")
SIZE = 64
PIXEL_TOL = 1e-3


def test_timesteps_are_diffusers_for_every_step_count() -> None:
    scheduler = diffusers.LCMScheduler()
    for steps in range(1, ORIGINAL_STEPS + 1):
        scheduler.set_timesteps(steps)
        assert lcm_timesteps(1000, steps).long().tolist() == scheduler.timesteps.tolist()
    with pytest.raises(ValueError, match="1 to 50 steps"):
        lcm_timesteps(1000, 51)
    with pytest.raises(ValueError, match="Karras sigmas do not apply"):
        get_sampler("lcm").sigmas(NoiseSchedule(), 4, karras=True)


def test_boundary_scalings_are_the_consistency_condition() -> None:
    scheduler = diffusers.LCMScheduler()
    for t in (0, 19, 259, 999):
        expected = scheduler.get_scalings_for_boundary_condition_discrete(t)
        assert boundary_scalings(t) == pytest.approx(expected)
    c_skip, c_out = boundary_scalings(0)
    assert (c_skip, c_out) == (1.0, 0.0)  # at t = 0 the sample is its own clean estimate


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_txt2img_matches_diffusers(tmp_path, guidance: float) -> None:
    pair = diffusers_pair(tmp_path, "sd1", SIZE)
    pipe = pair.txt2img
    pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
    negative = "blurry" if guidance > 1 else ""
    ours = pair.model.txt2img(
        "a lighthouse at dawn",
        negative,
        steps=4,
        guidance_scale=guidance,
        width=SIZE,
        height=SIZE,
        sampler="lcm",
        seed=7,
        n_samples=2,
        output_type="np",
        progress=False,
    ).images
    theirs = pipe(
        "a lighthouse at dawn",
        negative_prompt=negative,
        num_inference_steps=4,
        guidance_scale=guidance,
        height=SIZE,
        width=SIZE,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).images
    assert theirs.std() > 0.05 and ((theirs > 0.02) & (theirs < 0.98)).mean() > 0.5
    err = float(np.abs(ours - theirs).max())
    print(f"LCM txt2img, guidance {guidance}: max abs pixel error {err:.2e}")
    assert err <= PIXEL_TOL
