"""T2I-Adapter on tiny random models: the network against diffusers' ``T2IAdapter`` (3- and 1-channel
images), whole images against ``StableDiffusionAdapterPipeline`` (one adapter with a weight, two
through diffusers' ``MultiAdapter``), the reference single file against its diffusers folder, and the
errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from openldm.checkpoints.errors import AdapterError
from openldm.checkpoints.formats.t2i_adapter import t2i_adapter_from_diffusers, t2i_adapter_to_diffusers
from openldm.nn.t2i_adapter import T2IAdapter, T2IAdapterConfig
from openldm.pipelines.options import Control
from tests.helpers import assert_images_match
from tests.oracles import diffusers_pair
from tests.test_controlnet import control_image

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("single_thread")
SIZE, STEPS, PROMPT, NEGATIVE = 64, 4, "a lighthouse at dawn", "blurry"
PIXEL_TOL = 1e-3
WIDTHS = (32, 64, 64)  # the tiny SD 1 UNet's level widths


def diffusers_adapter(seed: int, in_channels: int = 3, widths: tuple[int, ...] = WIDTHS) -> Any:
    net = diffusers.T2IAdapter(in_channels=in_channels, channels=list(widths), num_res_blocks=2).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def write_original(net: Any, path: Path) -> Path:
    """As the released SD 1.x adapters ship: ``conv_in``, ``body.N.*``."""
    ours = t2i_adapter_from_diffusers(net.state_dict())
    safetensors.torch.save_file({k: v.contiguous() for k, v in ours.items()}, str(path))
    return path


def write_folder(net: Any, path: Path) -> Path:
    net.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Any:
    return diffusers_pair(tmp_path_factory.mktemp("t2i-adapter"), "sd1", SIZE)


@pytest.mark.parametrize("in_channels", [3, 1])
def test_the_network_matches_diffusers(in_channels: int) -> None:
    theirs = diffusers_adapter(0, in_channels)
    ours = T2IAdapter(T2IAdapterConfig(in_channels, WIDTHS)).eval()
    ours.load_state_dict(t2i_adapter_from_diffusers(theirs.state_dict()))
    assert t2i_adapter_to_diffusers(ours.state_dict(), 2).keys() == theirs.state_dict().keys()
    image = torch.rand(2, in_channels, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine, reference = ours(image), theirs(image)
    assert [tuple(f.shape) for f in mine] == [(2, 32, 8, 12), (2, 64, 4, 6), (2, 64, 2, 3)]
    for a, b in zip(mine, reference, strict=True):
        assert float((a - b).abs().max() / b.abs().max()) <= 1e-6


def _ours(model: Any, controls: list[Control]) -> np.ndarray:
    return model.txt2img(
        PROMPT, NEGATIVE, steps=STEPS, width=SIZE, height=SIZE, seed=7, output_type="np",
        progress=False, controls=controls,
    ).images  # fmt: skip


def _theirs(pair: Any, adapter: Any, images: Any, scale: Any) -> np.ndarray:
    parts = pair.txt2img.components
    pipe = diffusers.StableDiffusionAdapterPipeline(
        **{k: parts[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
        adapter=adapter, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    noise = torch.randn([1, 4, SIZE // 8, SIZE // 8], generator=torch.Generator().manual_seed(7))
    return pipe(
        PROMPT, images, num_inference_steps=STEPS, height=SIZE, width=SIZE, negative_prompt=NEGATIVE,
        latents=noise, output_type="np", adapter_conditioning_scale=scale,
    ).images  # fmt: skip


def test_images_match_diffusers_adapter_pipeline(pair, tmp_path) -> None:
    nets = [diffusers_adapter(1), diffusers_adapter(2)]
    paths = [write_original(net, tmp_path / f"adapter-{i}.safetensors") for i, net in enumerate(nets)]
    ours = [pair.model.load_controlnet(p) for p in paths]
    assert all(isinstance(net, T2IAdapter) for net in ours)
    images = [control_image(3), control_image(4)]
    plain = _ours(pair.model, [])
    cases = {
        "one, weight 0.8": ([Control(ours[0], images[0], 0.8)], nets[0], images[0], 0.8),
        "two, weights 0.7 and 0.5": (
            [Control(ours[0], images[0], 0.7), Control(ours[1], images[1], 0.5)],
            diffusers.MultiAdapter(nets),
            images,
            [0.7, 0.5],
        ),
    }
    for name, (controls, adapter, their_images, scale) in cases.items():
        theirs = _theirs(pair, adapter, their_images, scale)
        assert_images_match(f"T2I-Adapter {name}", _ours(pair.model, controls), theirs, plain, PIXEL_TOL)


def test_the_single_file_and_the_diffusers_folder_give_one_image(pair, tmp_path) -> None:
    net = diffusers_adapter(5, in_channels=1)
    original = write_original(net, tmp_path / "t2iadapter_sketch.safetensors")
    folder = write_folder(net, tmp_path / "t2i-sketch")
    assert json.loads((folder / "config.json").read_text())["adapter_type"] == "full_adapter"
    sketch = Image.fromarray(
        np.asarray(control_image(6))[..., 0]
    )  # a grey image, as the sketch adapters read
    images = [
        _ours(pair.model, [Control(pair.model.load_controlnet(p), sketch, 1.0, 0.0, 0.5)])
        for p in (original, folder)
    ]
    assert np.abs(images[0] - images[1]).max() <= 1e-6  # the same tensors, read from two layouts
    assert float(np.abs(images[0] - _ours(pair.model, [])).max()) > 20 * PIXEL_TOL


def test_the_errors_name_the_problem(pair, tmp_path) -> None:
    wider = write_original(diffusers_adapter(0, widths=(64, 128, 128)), tmp_path / "sd2-widths.safetensors")
    with pytest.raises(AdapterError, match=r"level widths \(64, 128, 128\), not this model's \(32, 64, 64\)"):
        pair.model.load_controlnet(wider)
    xl = {"conv_in.weight": torch.zeros(32, 768, 3, 3)} | {
        f"body.0.block{i}.weight": torch.zeros(32, 32, 1, 1) for i in (1, 2)
    }
    safetensors.torch.save_file(xl, str(tmp_path / "xl.safetensors"))
    with pytest.raises(AdapterError, match="folds its image into 768 channels"):
        pair.model.load_controlnet(tmp_path / "xl.safetensors")
    light = {"body.0.body.0.block1.weight": torch.zeros(8, 8, 3, 3)}
    safetensors.torch.save_file(light, str(tmp_path / "color.safetensors"))
    with pytest.raises(AdapterError, match=r"light \(color\) T2I-Adapter"):
        pair.model.load_controlnet(tmp_path / "color.safetensors")
    adapter = pair.model.load_controlnet(write_original(diffusers_adapter(1), tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match="T2I-Adapter: control mode 'control' is for ControlNets only"):
        _ours(pair.model, [Control(adapter, control_image(3), mode="control")])


def test_command_line_runs_an_adapter_and_checks_the_aspect_before_loading(
    tmp_path, capsys, monkeypatch
) -> None:
    import openldm
    from openldm.cli import main
    from openldm.commands import common
    from openldm.images import read_parameters

    unet = openldm.load().unet.config
    widths = tuple(unet.model_channels * m for m in unet.channel_mult)
    path = write_original(diffusers_adapter(8, widths=widths), tmp_path / "t2iadapter_shapes.safetensors")
    control_image(9).save(tmp_path / "square.png")
    base = ["txt2img", "--prompt", "a red circle", "--ddim_steps", "3", "--n_samples", "1", "--n_iter", "1"]
    base += ["--seed", "3", "--skip_grid", "--controlnet", str(path)]
    argv = [*base, "--control-image", str(tmp_path / "square.png"), "--control-weight", "0.6"]
    assert main([*argv, "--outdir", str(tmp_path / "out")]) == 0
    written = next((tmp_path / "out" / "samples").iterdir())
    assert read_parameters(written)["ControlNet 0"].startswith("Module: none, Model: t2iadapter_shapes [")

    def no_loading(*_: Any) -> None:
        raise AssertionError("the model was read before the control image was checked")

    monkeypatch.setattr(common, "load_model", no_loading)
    control_image(9, (96, 64)).save(tmp_path / "wide.png")
    capsys.readouterr()
    assert main([*base, "--control-image", str(tmp_path / "wide.png"), "--outdir", str(tmp_path / "w")]) == 2
    assert "control image 1 is 96x64, another aspect than the square output" in capsys.readouterr().err
