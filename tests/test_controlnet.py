"""ControlNet on tiny random models: the network against diffusers' ``ControlNetModel``, whole images
against ``StableDiffusionControlNetPipeline`` (one and two ControlNets, weights, start/end, guess mode),
the original single file and the diffusers folder, and the errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from openldm.checkpoints.errors import AdapterError
from openldm.checkpoints.formats.controlnet import controlnet_from_diffusers
from openldm.checkpoints.formats.unet import unet_config_to_diffusers
from openldm.nn.controlnet import ControlNetModel
from openldm.pipelines.options import Control
from tests.helpers import assert_images_match
from tests.oracles import diffusers_pair
from tests.tiny import TINY

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("single_thread")
SIZE, STEPS, PROMPT, NEGATIVE = 64, 4, "a lighthouse at dawn", "blurry"
PIXEL_TOL = 1e-3
_UNET_KEYS = (
    "in_channels",
    "down_block_types",
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "attention_head_dim",
    "use_linear_projection",
    "upcast_attention",
    "only_cross_attention",
    "norm_num_groups",
)


def diffusers_controlnet(variant: str, seed: int) -> Any:
    """diffusers' ControlNetModel for the tiny ``variant`` UNet, every weight random (zero convs too)."""
    config = unet_config_to_diffusers(TINY[variant].unet)
    net = diffusers.ControlNetModel(**{k: config[k] for k in _UNET_KEYS if k in config}).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def write_original(net: Any, variant: str, path: Path) -> Path:
    """The ControlNet as the ControlNet 1.x files ship: ``control_model.*`` in the original names."""
    with torch.device("meta"):
        keys = list(ControlNetModel(TINY[variant].unet).state_dict())
    ours = controlnet_from_diffusers(net.state_dict(), keys, TINY[variant].unet)
    safetensors.torch.save_file({f"control_model.{k}": v.contiguous() for k, v in ours.items()}, str(path))
    return path


def control_image(seed: int, size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Any:
    return diffusers_pair(tmp_path_factory.mktemp("controlnet"), "sd1", SIZE)


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_the_network_matches_diffusers(variant: str) -> None:
    theirs = diffusers_controlnet(variant, 0)
    ours = ControlNetModel(TINY[variant].unet).eval()
    ours.load_state_dict(controlnet_from_diffusers(theirs.state_dict(), list(ours.state_dict()), ours.config))
    g = torch.Generator().manual_seed(1)
    x, hint = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    context = torch.randn(2, 77, TINY[variant].unet.context_dim, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        down, mid = theirs(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
        mine = ours(x, t, hint, context)
    for a, b in zip(mine, [*down, mid], strict=True):
        assert float((a - b).abs().max() / b.abs().max()) <= 1e-5


def _ours(model: Any, controls: list[Control], **options: Any) -> np.ndarray:
    return model.txt2img(
        PROMPT, NEGATIVE, steps=STEPS, width=SIZE, height=SIZE, seed=7, output_type="np",
        progress=False, controls=controls, **options,
    ).images  # fmt: skip


def _theirs(pair: Any, nets: list[Any], images: list[Image.Image], **options: Any) -> np.ndarray:
    pipe = diffusers.StableDiffusionControlNetPipeline(
        **{k: v for k, v in pair.txt2img.components.items() if k != "image_encoder"},
        controlnet=nets if len(nets) > 1 else nets[0],
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    noise = torch.randn([1, 4, SIZE // 8, SIZE // 8], generator=torch.Generator().manual_seed(7))
    return pipe(
        PROMPT, images if len(images) > 1 else images[0], num_inference_steps=STEPS, height=SIZE,
        width=SIZE, negative_prompt=NEGATIVE, latents=noise, output_type="np", **options,
    ).images  # fmt: skip


def test_images_match_diffusers_controlnet_pipeline(pair, tmp_path) -> None:
    nets = [diffusers_controlnet("sd1", 1), diffusers_controlnet("sd1", 2)]
    paths = [write_original(net, "sd1", tmp_path / f"control-{i}.safetensors") for i, net in enumerate(nets)]
    ours_nets = [pair.model.load_controlnet(p) for p in paths]
    images = [control_image(3), control_image(4)]
    plain = _ours(pair.model, [])
    cases = {
        "one, weight 0.8, steps 0-0.75": (
            [Control(ours_nets[0], images[0], 0.8, 0.0, 0.75)],
            {"controlnet_conditioning_scale": 0.8, "control_guidance_end": 0.75},
        ),
        "two, weights and start/end": (
            [Control(ours_nets[0], images[0], 0.7), Control(ours_nets[1], images[1], 0.5, 0.25, 1.0)],
            {
                "controlnet_conditioning_scale": [0.7, 0.5],
                "control_guidance_start": [0.0, 0.25],
                "control_guidance_end": [1.0, 1.0],
            },
        ),
        "guess mode": (
            [Control(ours_nets[0], images[0], 1.0, mode="control")],
            {"guess_mode": True},
        ),
    }
    for name, (controls, theirs_options) in cases.items():
        used = nets[: len(controls)]
        theirs = _theirs(pair, used, images[: len(controls)], **theirs_options)
        assert_images_match(name, _ours(pair.model, controls), theirs, plain, PIXEL_TOL)


def test_original_file_and_diffusers_folder_give_the_same_network(pair, tmp_path) -> None:
    net = diffusers_controlnet("sd1", 5)
    net.save_pretrained(tmp_path / "folder")
    from_file = pair.model.load_controlnet(write_original(net, "sd1", tmp_path / "original.safetensors"))
    from_folder = pair.model.load_controlnet(tmp_path / "folder")
    a, b = from_file.state_dict(), from_folder.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    image = control_image(6)
    assert np.array_equal(
        _ours(pair.model, [Control(from_file, image)]), _ours(pair.model, [Control(from_folder, image)])
    )


def test_a_controlnet_of_another_version_or_an_image_of_another_aspect_is_one_error(pair, tmp_path) -> None:
    path = write_original(diffusers_controlnet("sd2", 0), "sd2", tmp_path / "sd2.safetensors")
    with pytest.raises(
        AdapterError,
        match=r"a ControlNet for 128-wide text, not this model \(128-wide text\): model_channels 64, not 32",
    ):
        pair.model.load_controlnet(path)
    net = pair.model.load_controlnet(
        write_original(diffusers_controlnet("sd1", 0), "sd1", tmp_path / "a.safetensors")
    )
    with pytest.raises(ValueError, match="control image 1 is 96x64, another aspect than the 64x64 output"):
        _ours(pair.model, [Control(net, control_image(0, (96, 64)))])


def _init_image() -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    rgb = np.stack([np.sin(6 * x) * 0.5 + 0.5, y, (x * y) ** 0.5], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def test_img2img_matches_diffusers_controlnet_img2img(pair, tmp_path) -> None:
    net = diffusers_controlnet("sd1", 8)
    ours_net = pair.model.load_controlnet(write_original(net, "sd1", tmp_path / "c.safetensors"))
    hint, init = control_image(9), _init_image()
    ours = pair.model.img2img(
        PROMPT, init, NEGATIVE, strength=0.6, steps=8, seed=99, output_type="np", progress=False,
        controls=[Control(ours_net, hint, 0.9, 0.0, 0.8)],
    ).images  # fmt: skip
    pipe = diffusers.StableDiffusionControlNetImg2ImgPipeline(
        **{k: v for k, v in pair.txt2img.components.items() if k != "image_encoder"}, controlnet=net
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    theirs = pipe(
        PROMPT, image=init, control_image=hint, negative_prompt=NEGATIVE, strength=0.6, num_inference_steps=8,
        controlnet_conditioning_scale=0.9, control_guidance_end=0.8,
        generator=torch.Generator("cpu").manual_seed(99), output_type="np",
    ).images  # fmt: skip
    plain = pair.model.img2img(
        PROMPT, init, NEGATIVE, strength=0.6, steps=8, seed=99, output_type="np", progress=False
    ).images
    err = float(np.abs(ours - theirs).max())
    print(f"img2img: max abs pixel error {err:.2e}")
    assert float(np.abs(theirs - plain).max()) > 20 * PIXEL_TOL and err <= PIXEL_TOL


def test_inpaint_matches_diffusers_controlnet_inpaint(tmp_path) -> None:
    from tests.oracles import inpaint_pair

    pair = inpaint_pair(tmp_path, "sd1-inpaint", SIZE)
    net = diffusers_controlnet("sd1", 10)  # a 4-channel ControlNet guides the 9-channel inpainting UNet
    ours_net = pair.model.load_controlnet(write_original(net, "sd1", tmp_path / "c.safetensors"))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[16:48, 8:40] = 255
    mask_image, hint, init = Image.fromarray(mask), control_image(11), _init_image()
    ours = pair.model.inpaint(
        PROMPT, init, mask_image, NEGATIVE, steps=6, guidance_scale=5.0, seed=4, output_type="np",
        progress=False, controls=[Control(ours_net, hint, 0.8)],
    ).images  # fmt: skip
    pipe = diffusers.StableDiffusionControlNetInpaintPipeline(
        **{k: v for k, v in pair.pipe.components.items() if k != "image_encoder"}, controlnet=net
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    theirs = pipe(
        PROMPT, image=init, mask_image=mask_image, control_image=hint, negative_prompt=NEGATIVE,
        num_inference_steps=6, guidance_scale=5.0, controlnet_conditioning_scale=0.8,
        generator=torch.Generator("cpu").manual_seed(4), output_type="np",
    ).images  # fmt: skip
    plain = pair.model.inpaint(
        PROMPT,
        init,
        mask_image,
        NEGATIVE,
        steps=6,
        guidance_scale=5.0,
        seed=4,
        output_type="np",
        progress=False,
    ).images
    err = float(np.abs(ours - theirs).max())
    print(f"inpaint: max abs pixel error {err:.2e}")
    assert float(np.abs(theirs - plain).max()) > 20 * PIXEL_TOL and err <= PIXEL_TOL


def test_canny_finds_opencvs_edges_and_the_other_preprocessors() -> None:
    from PIL import ImageDraw, ImageFilter

    from openldm.control_images import canny, preprocess

    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    image = Image.new("RGB", (128, 128), (40, 60, 80))
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        x, y, w, h = (int(v) for v in rng.integers(5, 90, 4))
        draw.ellipse(
            (x, y, x + w // 2 + 8, y + h // 2 + 8), fill=tuple(int(v) for v in rng.integers(0, 255, 3))
        )
    ours = np.asarray(canny(image))[..., 0] > 0
    blurred = np.asarray(image.convert("L").filter(ImageFilter.GaussianBlur(1.0)))
    theirs = cv2.Canny(blurred, 100, 200, L2gradient=True) > 0

    def near(mask: np.ndarray) -> np.ndarray:
        return cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0

    assert theirs.sum() > 100 and abs(int(ours.sum()) - int(theirs.sum())) <= 0.05 * theirs.sum()
    assert (ours & near(theirs)).sum() == ours.sum() and (theirs & near(ours)).sum() == theirs.sum()
    page = Image.new("RGB", (8, 8), (250, 250, 250))
    page.putpixel((3, 3), (10, 10, 10))
    scribble = np.asarray(preprocess(page, "scribble"))
    assert scribble[3, 3].tolist() == [255, 255, 255] and scribble[0, 0].tolist() == [0, 0, 0]
    assert np.asarray(preprocess(page, "invert"))[3, 3].tolist() == [245, 245, 245]
    with pytest.raises(ValueError, match="the openpose preprocessor needs the OpenPose body model"):
        preprocess(page, "openpose")


def test_command_line_with_two_controlnets_writes_their_parameters(tmp_path, capsys) -> None:
    import openldm
    from openldm.cli import main
    from openldm.images import read_parameters

    model = openldm.load()
    g = torch.Generator().manual_seed(0)
    paths = []
    for index in range(2):
        net = ControlNetModel(model.unet.config)
        sd = {
            f"control_model.{k}": torch.randn(v.shape, generator=g) * 0.05
            for k, v in net.state_dict().items()
        }
        paths.append(tmp_path / f"cn{index}.safetensors")
        safetensors.torch.save_file(sd, str(paths[-1]))
    picture = Image.new("RGB", (64, 64), (240, 240, 240))
    picture.paste((20, 20, 20), (20, 20, 44, 44))
    picture.save(tmp_path / "square.png")
    base = ["txt2img", "--prompt", "a red circle", "--ddim_steps", "3", "--n_samples", "1", "--n_iter", "1"]
    base += ["--seed", "3", "--skip_grid"]
    controls = ["--controlnet", str(paths[0]), "--control-image", str(tmp_path / "square.png")]
    controls += ["--controlnet", str(paths[1]), "--control-image", str(tmp_path / "square.png")]
    controls += ["--control-preprocess", "canny", "--control-preprocess", "invert", "--control-weight", "0.5"]
    controls += ["--control-end", "1", "--control-end", "0.5"]
    assert main([*base, "--outdir", str(tmp_path / "plain")]) == 0
    assert main([*base, *controls, "--outdir", str(tmp_path / "controlled")]) == 0
    plain = np.asarray(Image.open(next((tmp_path / "plain" / "samples").iterdir())), dtype=np.float32)
    written = next((tmp_path / "controlled" / "samples").iterdir())
    assert np.abs(np.asarray(Image.open(written), dtype=np.float32) - plain).max() > 5
    parameters = read_parameters(written)
    assert parameters["ControlNet 0"].startswith("Module: canny, Model: cn0 [")
    assert parameters["ControlNet 1"].endswith(
        "Weight: 0.5, Guidance Start: 0.0, Guidance End: 0.5, Control Mode: Balanced"
    )
    capsys.readouterr()
    assert main([*base, *controls[:4], "--control-image", str(tmp_path / "square.png")]) == 2
    assert "1 --controlnet but 2 --control-image" in capsys.readouterr().err
    Image.new("RGB", (96, 64)).save(tmp_path / "wide.png")
    argv = [*base, "--controlnet", str(paths[0]), "--control-image", str(tmp_path / "wide.png")]
    assert main([*argv, "--outdir", str(tmp_path / "wide")]) == 2
    assert "another aspect than the square output" in capsys.readouterr().err


def test_the_prompt_mode_ramps_the_residuals_on_both_halves() -> None:
    """ "My prompt is more important": residual i of n times weight * 10 ** (i / (n - 1) - 1), every row."""
    from openldm.nn.unet import UNetModel
    from openldm.pipelines.control import ControlledUNet, PreparedControl
    from openldm.sampling.schedule import NoiseSchedule

    config = TINY["sd1"].unet
    torch.manual_seed(0)
    unet, net = UNetModel(config).eval(), ControlNetModel(config).eval()
    for p in [*unet.out.parameters(), *net.zero_convs.parameters(), *net.middle_block_out.parameters()]:
        torch.nn.init.normal_(p, std=0.5)
    g = torch.Generator().manual_seed(1)
    x, hint = torch.randn(2, 4, 8, 8, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    context = torch.randn(2, 77, config.context_dim, generator=g)
    schedule = NoiseSchedule(TINY["sd1"].schedule)
    sigmas = torch.tensor([14.6, 1.0, 0.0])
    controlled = ControlledUNet(unet, [PreparedControl(net, hint, 0.6, 0.0, 1.0, "prompt")], schedule, sigmas)
    t = schedule.sigma_to_t(sigmas[:1]).expand(2)
    with torch.no_grad():
        residuals = net(x, t, hint.expand(2, -1, -1, -1), context)
        n = len(residuals)
        ramped = [r * 0.6 * 10 ** (i / (n - 1) - 1) for i, r in enumerate(residuals)]
        expected = unet(x, t, context, control=ramped)
        actual = controlled(x, t, context, control_scale=torch.tensor([1.0, 0.0]))
        plain = unet(x, t, context)
    assert float((actual - expected).abs().max() / expected.abs().max()) <= 1e-5
    assert float((actual - plain).abs().max() / plain.abs().max()) > 0.05
