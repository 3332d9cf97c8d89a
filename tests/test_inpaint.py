"""Inpainting on tiny random weights: 9-channel models against diffusers' StableDiffusionInpaintPipeline
loaded from the same diffusers folder (same scheduler, same generator), the latent-blending fallback of
4-channel models (against diffusers' legacy path at strength < 1, and its analytic properties),
paste-back, masks, and the ``openldm inpaint`` command end to end with its bad inputs.

Parity is measured in pixel space, [0, 1] floats; run with ``-s`` to see the errors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import openldm
from openldm import cli
from openldm.images import pil_to_tensor, read_parameters
from openldm.model import StableDiffusion
from openldm.pipelines.common import sampling_sigmas
from openldm.pipelines.inpaint import inpaint, prepare_mask
from openldm.sampling.samplers import SAMPLERS
from tests.oracles import InpaintPair, inpaint_pair

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

VARIANTS = (
    "inpaint",
    "sd1-inpaint",
    "sd1",
)  # 9 channels (SD 2 and SD 1 layouts), and a plain 4-channel model
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler"}
PROMPT = "a vase of sunflowers on a wooden table"
NEGATIVE = "blurry"
SIZE = 64
STEPS = 6
PIXEL_TOL = 1e-3
ERRORS: dict[str, float] = {}


pytestmark = pytest.mark.usefixtures("single_thread")


def _pair(root: Path, variant: str) -> InpaintPair:
    return inpaint_pair(root, variant, SIZE)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, InpaintPair]:
    root = tmp_path_factory.mktemp("inpaint")
    return {variant: _pair(root, variant) for variant in VARIANTS}


def _image(width: int = SIZE, height: int = SIZE) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([np.sin(6 * x) * 0.5 + 0.5, y, (x * y) ** 0.5], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def _mask(width: int = SIZE, height: int = SIZE) -> Image.Image:
    """A white rectangle on 8-pixel boundaries (so the latent mask is exact), with grey levels
    on either side of 0.5 at its edge (they binarise)."""
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 8 : 5 * width // 8] = 255
    mask[height // 4, width // 8 : 5 * width // 8] = 130  # >= 0.5: repaint
    mask[height // 4 - 1, width // 8 : 5 * width // 8] = 120  # < 0.5: keep
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return _image()


@pytest.fixture(scope="module")
def mask() -> Image.Image:
    return _mask()


def _scheduler(pipe: Any, sampler: str) -> None:
    cls = getattr(diffusers, SCHEDULERS[sampler])
    pipe.scheduler = cls.from_config(pipe.scheduler.config, timestep_spacing=SAMPLERS[sampler].spacing)


def _check_pixels(name: str, ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    assert ((theirs > 0.02) & (theirs < 0.98)).mean() > 0.5, "images are saturated: the test is vacuous"
    assert theirs.std() > 0.05
    err = float(np.abs(ours - theirs).max())
    ERRORS[name] = err
    assert err <= PIXEL_TOL, f"{name}: max abs pixel error {err:.2e} > {PIXEL_TOL}"


def _both(pair: InpaintPair, image: Image.Image, mask: Image.Image, sampler: str, strength: float, seed: int):
    _scheduler(pair.pipe, sampler)
    ours = inpaint(
        pair.model,
        PROMPT,
        image,
        mask,
        NEGATIVE,
        strength=strength,
        steps=STEPS,
        guidance_scale=5.0,
        sampler=sampler,
        seed=seed,
        n_samples=2,
        output_type="np",
        progress=False,
    )
    # The same generator, drawn in the same order: init image posterior, noise, masked image posterior.
    theirs = pair.pipe(
        PROMPT,
        image=image,
        mask_image=mask,
        negative_prompt=NEGATIVE,
        strength=strength,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        num_images_per_prompt=2,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).images
    return ours, theirs


@pytest.mark.parametrize(
    ("variant", "sampler", "strength"),
    [
        ("inpaint", "ddim", 1.0),
        ("inpaint", "euler", 0.6),
        ("sd1-inpaint", "euler", 1.0),
        ("sd1-inpaint", "ddim", 0.5),
    ],
)
def test_nine_channel_inpainting_matches_diffusers(pairs, image, mask, variant, sampler, strength) -> None:
    ours, theirs = _both(pairs[variant], image, mask, sampler, strength, seed=11)
    _check_pixels(f"inpaint {variant} {sampler} strength {strength}", ours.images, theirs)
    assert not np.allclose(ours.images[0], ours.images[1], atol=1e-2)  # two different samples


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_blending_matches_diffusers_legacy_path_below_strength_one(pairs, image, mask, sampler) -> None:
    """4-channel models: diffusers replaces the kept region after every step; we do it in the
    denoiser. For a deterministic sampler at strength < 1 the two are the same computation."""
    ours, theirs = _both(pairs["sd1"], image, mask, sampler, 0.6, seed=5)
    _check_pixels(f"blend sd1 {sampler} strength 0.6", ours.images, theirs)


def _latent_inputs(model: StableDiffusion, image: Image.Image, seed: int, batch: int):
    """The init latent and the starting noise the pipeline draws for ``seed`` (4-channel model)."""
    generator = torch.Generator().manual_seed(seed)
    z = model.vae.to_latent(pil_to_tensor(image), generator=generator)
    return z, torch.randn([batch, 4, SIZE // 8, SIZE // 8], generator=generator)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_blending_keeps_the_init_latent(pairs, image, mask, strength: float) -> None:
    model = pairs["sd1"].model
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []
    out = inpaint(
        model,
        PROMPT,
        image,
        mask,
        strength=strength,
        steps=6,
        sampler="euler",
        seed=21,
        n_samples=2,
        output_type="latent",
        progress=False,
        callback=lambda i, n, x, x0: steps.append((x, x0)),
    )
    z, noise = _latent_inputs(model, image, 21, 2)
    keep = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    keep[..., 2:6, 1:5] = False  # the white rectangle at latent size
    assert len(steps) == int(strength * 6)
    # The kept region of the result is the init latent, bit for bit; the rest was painted.
    assert torch.equal(torch.where(keep, out.latents, 0), torch.where(keep, z.expand(2, -1, -1, -1), 0))
    assert (out.latents - z).abs().amax(dim=1)[:, ~keep[0, 0]].min() > 1e-3
    # The denoiser returns z in the kept region, so Euler moves it along z + sigma * noise.
    sigmas = sampling_sigmas(model, SAMPLERS["euler"], 6, False)[6 - len(steps) :]
    for i, (x, x0) in enumerate(steps):
        assert torch.equal(torch.where(keep, x0, 0), torch.where(keep, z.expand_as(x0), 0))
        if strength < 1:  # started on that path
            expected = z + float(sigmas[i + 1]) * noise
            assert torch.allclose(torch.where(keep, x, 0), torch.where(keep, expected, 0), atol=1e-5)


def test_white_mask_is_img2img_and_black_mask_keeps_everything(pairs, image) -> None:
    model = pairs["sd1"].model
    options = {"strength": 0.5, "steps": 4, "seed": 8, "output_type": "latent", "progress": False}
    white = Image.new("L", (SIZE, SIZE), 255)
    assert torch.equal(
        inpaint(model, PROMPT, image, white, **options).latents,
        model.img2img(PROMPT, image, **options).latents,
    )
    black = Image.new("L", (SIZE, SIZE), 0)
    z, _ = _latent_inputs(model, image, 8, 1)
    assert torch.equal(inpaint(model, PROMPT, image, black, **options).latents, z)
    kept = inpaint(model, PROMPT, image, black, **{**options, "output_type": "pil"}, paste_back=True)
    assert np.array_equal(np.asarray(kept.images[0]), np.asarray(image))


def test_paste_back_copies_the_kept_pixels_exactly(pairs, image, mask) -> None:
    model = pairs["sd1-inpaint"].model
    options = {"steps": 2, "seed": 2, "n_samples": 2, "progress": False}
    plain = inpaint(model, PROMPT, image, mask, **options)
    pasted = inpaint(model, PROMPT, image, mask, **options, paste_back=True)
    repaint = np.asarray(mask) >= 128
    original = np.asarray(image)
    for before, after in zip(plain.images, pasted.images, strict=True):
        assert after.info["parameters"] == before.info["parameters"]
        before_px, after_px = np.asarray(before), np.asarray(after)
        assert np.array_equal(after_px[~repaint], original[~repaint])
        assert np.array_equal(after_px[repaint], before_px[repaint])
        assert not np.array_equal(before_px[~repaint], original[~repaint])  # the VAE alone changes pixels
    as_np = inpaint(model, PROMPT, image, mask, **options, output_type="np", paste_back=True).images
    expected = original[~repaint].astype(np.float32) / 255
    assert all(np.array_equal(array[~repaint], expected) for array in as_np)
    as_pt = inpaint(model, PROMPT, image, mask, **options, output_type="pt", paste_back=True).images
    assert np.array_equal(as_pt.permute(0, 2, 3, 1).numpy(), as_np)


def test_masks_binarise_and_resize_with_the_image() -> None:
    small = prepare_mask(_mask(), SIZE, SIZE)
    assert small.shape == (1, 1, SIZE, SIZE) and set(small.unique().tolist()) == {0.0, 1.0}
    assert small[0, 0, SIZE // 4, SIZE // 8] == 1 and small[0, 0, SIZE // 4 - 1, SIZE // 8] == 0
    # A mask twice the size (same aspect ratio) is resized, then binarised.
    big = prepare_mask(_mask(2 * SIZE, 2 * SIZE), SIZE, SIZE)
    assert (big != small).float().mean() < 0.02
    # The init image's size before resizing decides: a 70x40 image works at 64x40 with a 70x40 mask.
    assert prepare_mask(_mask(70, 40), 64, 40, source_size=(70, 40)).shape == (1, 1, 40, 64)
    with pytest.raises(ValueError, match="the mask is 64x32 but the image is 64x64"):
        prepare_mask(_mask(SIZE, SIZE // 2), SIZE, SIZE)
    tensor = torch.zeros(SIZE, SIZE)
    tensor[:8, :8] = 0.7
    assert prepare_mask(tensor, SIZE, SIZE).sum() == 64
    with pytest.raises(ValueError, match="a mask tensor must be"):
        prepare_mask(torch.zeros(3, SIZE, SIZE), SIZE, SIZE)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"strength": 1.5}, "strength must be between 0 and 1, got 1.5"),
        ({"strength": -0.2}, "strength must be between 0 and 1"),
        ({"mask": "no-such-mask.png"}, "mask image 'no-such-mask.png' does not exist"),
        ({"image": "no-such-image.png"}, "init image 'no-such-image.png' does not exist"),
        ({"mask": Image.new("L", (SIZE, 2 * SIZE))}, "the mask is 64x128 but the image is 64x64"),
        ({"steps": 0}, "steps must be a whole number >= 1"),
        ({"sampler": "nope"}, "unknown sampler 'nope'"),
    ],
)
def test_inpaint_rejects_bad_input(pairs, image, mask, options: dict[str, Any], message: str) -> None:
    args = {"image": image, "mask": mask, "steps": 2, **options}
    model = pairs["sd1-inpaint"].model
    with pytest.raises(ValueError, match=message):
        inpaint(model, PROMPT, args.pop("image"), args.pop("mask"), **args, progress=False)


def test_other_variants_are_refused(pairs, image, mask) -> None:
    model = pairs["sd1"].model
    depth = dataclasses.replace(model, spec=dataclasses.replace(model.spec, variant="depth"))
    with pytest.raises(ValueError, match="this is a depth model; inpainting needs"):
        inpaint(depth, PROMPT, image, mask, steps=2)


# --- the command ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tiny_single_file) -> Path:
    return tiny_single_file("sd1-inpaint", "tiny-inpaint")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    paths = {name: folder / f"{name}.png" for name in ("image", "mask", "wide_mask", "not_an_image")}
    _image(70, 40).save(paths["image"])  # not a multiple of 8: worked on at 64x40
    _mask(70, 40).save(paths["mask"])
    _mask(80, 40).save(paths["wide_mask"])
    paths["not_an_image"].write_text("hello")
    return paths


@pytest.fixture
def main():
    """``openldm.cli.main``, which has the inpaint command."""
    return cli.main


def _run(main, capsys, *argv: str | Path) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_command_writes_samples_and_grid_with_parameters(main, ckpt, files, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv = [
        "inpaint",
        "--ckpt",
        ckpt,
        "--init-img",
        files["image"],
        "--mask",
        files["mask"],
        "--outdir",
        out,
        "--ddim_steps",
        "3",
        "--n_samples",
        "2",
        "--seed",
        "4",
        "--prompt",
        "a red door",
        "--paste-back",
    ]
    assert _run(main, capsys, *argv)[0] == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert (out / "grid-0000.png").is_file()
    params = read_parameters(out / "samples" / "00001.png")
    assert params == {
        "Prompt": "a red door",
        "Negative prompt": "",
        "Steps": 3,
        "Sampler": "DDIM",
        "CFG scale": 7.5,
        "Seed": 4,
        "Size": "64x40",
        "Model": "tiny-inpaint",
        "Denoising strength": 1.0,
        "Batch size": 2,
        "Batch pos": 1,
    }
    written = np.asarray(Image.open(out / "samples" / "00001.png"))
    model = openldm.load(ckpt)
    api = inpaint(
        model,
        "a red door",
        files["image"],
        files["mask"],
        steps=3,
        n_samples=2,
        seed=4,
        paste_back=True,
        progress=False,
    )
    assert np.array_equal(written, np.asarray(api.images[1]))
    # Paste-back: the kept pixels are the init image's (resized to 64x40 as the pipeline works on it).
    keep = prepare_mask(Image.open(files["mask"]), 64, 40, (70, 40))[0, 0].numpy() < 0.5
    init = np.asarray(_image(70, 40).resize((64, 40), Image.Resampling.LANCZOS))
    assert keep.mean() > 0.5 and np.array_equal(written[keep], init[keep])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strength", "1.5"], "--strength must be between 0 and 1, got 1.5"),
        (["--strength", "-0.5"], "--strength must be between 0 and 1"),
        (["--init-img", "no-such-image.png"], "--init-img 'no-such-image.png' does not exist"),
        (["--init-img", "NOT_AN_IMAGE"], "cannot read --init-img"),
        (["--mask", "no-such-mask.png"], "--mask 'no-such-mask.png' does not exist"),
        (["--mask", "NOT_AN_IMAGE"], "cannot read --mask"),
        (["--mask", "WIDE_MASK"], "the mask is 80x40 but the image is 70x40"),
        (["--H", "60"], "--H must be a positive multiple of 8, got 60"),
        (["--sampler", "magic"], "unknown sampler 'magic'"),
    ],
)
def test_command_bad_input_is_one_line_and_exit_2(main, ckpt, files, tmp_path, capsys, argv, message) -> None:
    names = {"NOT_AN_IMAGE": files["not_an_image"], "WIDE_MASK": files["wide_mask"]}
    base = [
        "inpaint",
        "--ckpt",
        ckpt,
        "--init-img",
        files["image"],
        "--mask",
        files["mask"],
        "--ddim_steps",
        "1",
    ]
    code, err = _run(main, capsys, *base, *[names.get(a, a) for a in argv], "--outdir", tmp_path / "out")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("openldm: error: ") and message in lines[0], err
    assert not (tmp_path / "out" / "samples").exists()


def test_command_needs_a_mask_and_has_help(main, ckpt, files, capsys) -> None:
    code, err = _run(main, capsys, "inpaint", "--ckpt", ckpt, "--init-img", files["image"])
    assert code == 2 and "the following arguments are required: --mask" in err and err.count("\n") == 1
    assert main(["inpaint", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--mask" in text and "--paste-back" in text and "default: 1.0" in text and "examples:" in text
