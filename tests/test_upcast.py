"""Half-precision weights kept so and computed in fp32 (``openldm.nn.upcast``): a fp16 file on the
CPU holds half the bytes and gives the image of the same file upcast at load (the same arithmetic:
equal here, within 1e-6 allowed for kernels that may pick another path for freshly cast weights);
add-on networks follow the model; asked for, the weights' own dtype computes."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch

import openldm
from openldm.nn.controlnet import ControlNetModel
from openldm.nn.upcast import compute_dtype
from openldm.pipelines.options import Control

pytestmark = pytest.mark.usefixtures("single_thread")
OPTIONS = {"steps": 3, "width": 64, "height": 64, "seed": 4, "output_type": "np", "progress": False}


@pytest.fixture(scope="module")
def fp16_file(tiny_single_file, tmp_path_factory):
    sd = safetensors.torch.load_file(str(tiny_single_file("sd1")))
    half = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp_path_factory.mktemp("fp16") / "tiny-sd1-fp16.safetensors"
    safetensors.torch.save_file(half, str(path))
    return path


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_fp16_weights_stay_fp16_and_give_the_upcast_image(fp16_file, tmp_path) -> None:
    kept = openldm.load(fp16_file)
    upcast = openldm.load(fp16_file, dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder"):
        network, reference = getattr(kept, name), getattr(upcast, name)
        assert {p.dtype for p in network.parameters()} == {torch.float16}
        assert compute_dtype(network) == torch.float32
        assert 2 * _bytes(network) == _bytes(reference)
    image = kept.txt2img("a lighthouse at dawn", **OPTIONS).images
    assert np.abs(image - upcast.txt2img("a lighthouse at dawn", **OPTIONS).images).max() <= 1e-6

    # A ControlNet read for the kept model is stored in fp16 and computes in fp32 like it.
    g = torch.Generator().manual_seed(0)
    net = ControlNetModel(kept.unet.config)
    sd = {
        f"control_model.{k}": (torch.randn(v.shape, generator=g) * 0.05).half()
        for k, v in net.state_dict().items()
    }
    safetensors.torch.save_file(sd, str(tmp_path / "cn.safetensors"))
    controls = [(model, model.load_controlnet(tmp_path / "cn.safetensors")) for model in (kept, upcast)]
    assert next(controls[0][1].parameters()).dtype == torch.float16
    hint = torch.rand(3, 64, 64, generator=g)
    images = [m.txt2img("a lighthouse", controls=[Control(n, hint)], **OPTIONS).images for m, n in controls]
    assert np.abs(images[0] - images[1]).max() <= 1e-6
    assert np.abs(images[0] - image).max() > 1e-2


def test_asked_for_the_weights_compute_in_their_own_dtype(fp16_file) -> None:
    model = openldm.load(fp16_file, compute_dtype=torch.float16)
    assert compute_dtype(model.unet) == torch.float16
    assert not hasattr(model.unet, "compute_dtype")  # nothing to upcast: fp16 layers as they are


def test_the_command_line_keeps_fp16_weights_unless_asked(fp16_file) -> None:
    from openldm.cli import build_parser
    from openldm.commands.common import load_model

    for extra, dtype in (([], torch.float16), (["--fp32-weights"], torch.float32)):
        args = build_parser().parse_args(["txt2img", "--ckpt", str(fp16_file), *extra])
        model = load_model(args)
        assert next(model.unet.parameters()).dtype == dtype
        assert compute_dtype(model.unet) == torch.float32
