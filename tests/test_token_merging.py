"""Token merging (``token_merging``, :mod:`openldm.nn.token_merging`): against tomesd (the authors'
package, patching a diffusers UNet with the same weights) with its random and its fixed destinations;
the merge and unmerge on their own; the option in the pipelines and the PNG parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import openldm
from openldm.checkpoints.formats.unet import unet_from_diffusers
from openldm.nn import token_merging
from openldm.nn.token_merging import merging_tokens, plan
from openldm.pipelines.options import GenerationOptions, OptionError
from tests.helpers import assert_close_rel
from tests.test_unet import ours_from, random_diffusers_unet, random_inputs, run_diffusers, run_ours
from tests.tiny import TINY

tomesd = pytest.importorskip("tomesd")
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("random", [True, False], ids=["random-destinations", "top-left-destinations"])
@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_matches_tomesd_on_diffusers(name: str, random: bool) -> None:
    cfg = TINY[name].unet
    reference = random_diffusers_unet(cfg)
    ours = ours_from(unet_from_diffusers(reference.state_dict(), cfg), cfg)
    inputs = random_inputs(cfg, size=16)
    plain = run_ours(ours, inputs)
    tomesd.apply_patch(reference, ratio=0.5, use_rand=random)
    try:
        torch.manual_seed(77)  # tomesd forks the global generator at its first merge
        expected = run_diffusers(reference, inputs)
    finally:
        tomesd.remove_patch(reference)
    generator = torch.Generator().manual_seed(77) if random else None
    with merging_tokens(0.5, (16, 16), generator):
        merged = run_ours(ours, inputs)
    error = assert_close_rel(merged, expected, tol=1e-4)
    print(f"{name}, random {random}: relative error vs tomesd {error:.2e}")
    # and merging did change the result (it is not the plain UNet's)
    assert ((merged - plain).abs().max() / plain.abs().max()).item() > 1e-3


def test_merge_then_unmerge_puts_every_token_back() -> None:
    g = torch.Generator().manual_seed(0)
    height, width, channels = 7, 6, 5  # 7 rows: the last is outside every 2x2 square
    x = torch.randn(2, height * width, channels, generator=g)
    merge, unmerge = plan(x, height, width, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(unmerge(merge(x)), x)  # ratio 0: nothing moves
    # Tokens that are exact copies of a neighbour merge into it; the unmerged result is the input itself.
    base = torch.randn(2, (height // 2) * (width // 2), channels, generator=g)
    grid = base.reshape(2, height // 2, width // 2, channels)
    copies = grid.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # every 2x2 square one value
    full = torch.cat([copies, torch.randn(2, 1, width, channels, generator=g)], dim=1).flatten(1, 2)
    merge, unmerge = plan(full, height, width, 0.5, torch.Generator().manual_seed(2))
    kept = merge(full)
    assert kept.shape == (2, height * width - int(height * width * 0.5), channels)
    assert_close_rel(unmerge(kept), full, tol=1e-6)


def test_only_the_full_resolution_merges() -> None:
    with merging_tokens(0.5, (64, 48)):
        assert token_merging.active(64, 48) is not None
        assert token_merging.active(32, 24) is None
    assert token_merging.active(64, 48) is None  # only inside the block
    with merging_tokens(0.0, (64, 48)):
        assert token_merging.active(64, 48) is None


def test_the_option_in_a_run_and_its_png_parameters() -> None:
    model = openldm.load()
    options = {"steps": 8, "seed": 4, "progress": False}
    whole = model.txt2img("a red circle on a blue background", output_type="np", **options).images
    merged = model.txt2img(
        "a red circle on a blue background", output_type="np", token_merging=0.5, **options
    )
    again = model.txt2img("a red circle on a blue background", output_type="np", token_merging=0.5, **options)
    np.testing.assert_array_equal(merged.images, again.images)  # reproducible: a fork of the run's generator
    difference = np.abs(merged.images - whole)
    print(
        f"token merging 0.5 vs none, 8 DDIM steps: mean {difference.mean():.4f}, max {difference.max():.3f}"
    )
    assert 0 < difference.mean() < 0.05
    image = model.txt2img("a red circle", token_merging=0.5, **options).images[0]
    assert "Token merging ratio: 0.5" in image.info["parameters"]
    with pytest.raises(OptionError, match=r"token_merging .* must be in \[0, 1\)"):
        GenerationOptions("a red circle", token_merging=1.0)
