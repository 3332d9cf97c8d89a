"""DeepCache-style feature reuse (``feature_reuse``, ``openldm.nn.unet.FeatureReuse``): a shallow call
given the deep feature its own full call kept returns that call's output (the same blocks on the same
inputs: equal here, 1e-6 allowed), at every branch; a run of N steps at interval 3 makes ceil(N / 3)
whole UNet calls and an image near the whole computation's; the option is checked and written in the
PNG parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import openldm
from openldm.nn.unet import FeatureReuse, FeatureReusingUNet, UNetModel
from openldm.pipelines.options import Control, GenerationOptions, OptionError
from tests.helpers import assert_close_rel
from tests.tiny import TINY

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("branch", [0, 1, 4])
def test_shallow_call_on_its_own_deep_feature_is_the_full_call(branch: int) -> None:
    torch.manual_seed(0)
    unet = UNetModel(TINY["sd1"].unet).eval()
    for p in unet.parameters():  # the zero-initialised output layer would make every output 0
        torch.nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, 128, generator=g)
    t = torch.tensor([300.0, 300.0])
    state = FeatureReuse(interval=2, branch=branch)
    with torch.no_grad():
        full = unet(x, t, context, reuse=state)
        assert state.deep is not None
        shallow = unet(x, t, context, reuse=state)
        other = unet(x, torch.tensor([700.0, 700.0]), context, reuse=state)
    assert full.abs().max() > 1e-2
    assert_close_rel(shallow, full, tol=1e-6)  # the same blocks on the same inputs (equal here)
    assert not torch.allclose(other, full)  # the shallow blocks do see the new timestep


def test_interval_3_makes_a_whole_call_every_third_step() -> None:
    model = openldm.load()
    calls = []
    hook = model.unet.middle_block.register_forward_hook(lambda *_: calls.append(1))
    options = {"steps": 10, "seed": 3, "output_type": "np", "progress": False}
    try:
        whole = model.txt2img("a red circle on a blue background", **options).images
        assert len(calls) == 10
        calls.clear()
        reused = model.txt2img("a red circle on a blue background", feature_reuse=3, **options).images
        assert len(calls) == math.ceil(10 / 3)
    finally:
        hook.remove()
    difference = np.abs(reused - whole)
    print(f"interval 3 vs whole, 10 DDIM steps: mean {difference.mean():.4f}, max {difference.max():.3f}")
    assert 0 < difference.mean() < 0.05


def test_option_is_checked_and_recorded(tmp_path) -> None:
    with pytest.raises(OptionError, match="feature_reuse"):
        GenerationOptions("a fox", feature_reuse=0)
    with pytest.raises(OptionError, match="does not combine with ControlNets"):
        GenerationOptions(
            "a fox", feature_reuse=2, controls=(Control(torch.nn.Identity(), torch.zeros(3, 8, 8)),)
        )
    with pytest.raises(ValueError, match="branch 99"):
        FeatureReusingUNet(openldm.load().unet, 2, branch=99)
    image = openldm.load().txt2img("a fox", steps=4, seed=1, feature_reuse=2, progress=False).images[0]
    assert "Feature reuse: 2" in image.info["parameters"]
