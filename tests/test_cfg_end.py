"""Guidance stopped for the last steps (``cfg_end``): the denoiser's rule, the noise level it stops at,
and whole images equal to diffusers' documented "dynamic classifier-free guidance" (a step-end callback
that sets the guidance scale to 0 and keeps the prompt's embeddings), with the cost it saves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openldm.pipelines.common import guidance_floor
from openldm.pipelines.options import OptionError
from openldm.sampling.denoiser import CFGDenoiser
from tests.oracles import diffusers_pair

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("single_thread")
PROMPT, NEGATIVE, STEPS = "a lighthouse at dawn", "blurry", 10


def test_the_floor_is_the_first_unguided_steps_sigma() -> None:
    sigmas = torch.linspace(10, 0, STEPS + 1)
    assert guidance_floor(sigmas, 1.0) == 0.0
    assert guidance_floor(sigmas, 0.8) == float(sigmas[8])
    assert guidance_floor(sigmas, 0.75) == float(sigmas[8])  # 7.5 guided steps round up to 8
    assert guidance_floor(sigmas, 0.1) == float(sigmas[1])


def test_below_the_floor_the_prediction_is_the_conditional_one() -> None:
    calls = []

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x * 0 + context.mean(dim=(1, 2))[:, None, None, None]

    cond, uncond = torch.full((1, 2, 3), 2.0), torch.full((1, 2, 3), 1.0)
    guided = CFGDenoiser(denoiser, cond, uncond, 7.0, guided_above=0.5)
    x = torch.zeros(1, 4, 2, 2)
    assert float(guided(x, torch.tensor([0.6])).mean()) == 1 + 7 * (2 - 1)
    assert float(guided(x, torch.tensor([0.5])).mean()) == 2.0
    assert calls == [2, 1]


def test_images_match_diffusers_dynamic_guidance(tmp_path) -> None:
    pair = diffusers_pair(tmp_path, "sd1", 64)
    pipe = pair.txt2img
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")

    def stop_guidance(pipe: object, step: int, timestep: object, kwargs: dict) -> dict:
        if step == int(STEPS * 0.6) - 1:  # after the 6th step: the last 4 unguided
            pipe._guidance_scale = 0.0
            kwargs["prompt_embeds"] = kwargs["prompt_embeds"].chunk(2)[-1]
        return kwargs

    noise = torch.randn([1, 4, 8, 8], generator=torch.Generator().manual_seed(3))
    theirs = pipe(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, height=64, width=64, latents=noise,
        output_type="np", callback_on_step_end=stop_guidance,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    ).images  # fmt: skip
    options = {"steps": STEPS, "width": 64, "height": 64, "seed": 3, "output_type": "np", "progress": False}
    ours = pair.model.txt2img(PROMPT, NEGATIVE, cfg_end=0.6, **options).images
    full = pair.model.txt2img(PROMPT, NEGATIVE, **options).images
    err = float(np.abs(ours - theirs).max())
    print(f"cfg_end 0.6: max abs pixel error {err:.2e}")
    assert err <= 1e-3
    assert float(np.abs(full - theirs).max()) > 20e-3  # stopping guidance changes the image
    with pytest.raises(OptionError, match=r"cfg_end .* must be in \(0, 1\]"):
        pair.model.txt2img(PROMPT, cfg_end=0.0, **options)
