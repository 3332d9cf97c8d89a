"""The x4 upscaler on tiny random weights: parity with diffusers' StableDiffusionUpscalePipeline loaded
from the same diffusers folder (same seed: the same low-res augmentation noise and starting latents,
same scheduler), the low-res schedule from each source, tiling, and the ``openldm upscale`` command.

Parity is measured in pixel space, [0, 1] floats; run with ``-s`` to see the errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import openldm
from openldm import cli
from openldm.checkpoints.errors import UnknownArchitectureError
from openldm.images import read_parameters
from openldm.model import StableDiffusion
from openldm.nn.clip import CLIPTextEncoder
from openldm.nn.unet import UNetModel
from openldm.nn.vae import AutoencoderKL
from openldm.pipelines.tiles import tile_starts, tile_window, tiles
from openldm.pipelines.upscale import LowResSchedule, low_res_schedule, upscale
from openldm.sampling.samplers import SAMPLERS
from openldm.tokenizer import CLIPTokenizer
from tests.oracles import (
    Oracles,
    pad_token,
    reference_yaml,
    single_file_state_dict,
    text_oracle,
    unet_oracle,
    vae_oracle,
    write_diffusers_folder,
    write_single_file,
)
from tests.tiny import TINY

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SPEC = TINY["x4-upscaler"]
PROMPT = "a photograph of a lighthouse, sharp details"
NEGATIVE = "blurry, low quality"
PIXEL_TOL = 1e-3
ERRORS: dict[str, float] = {}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def oracles() -> Oracles:
    return Oracles(unet_oracle(SPEC.unet), vae_oracle(SPEC.vae), text_oracle(SPEC.text))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, oracles) -> Path:
    folder = tmp_path_factory.mktemp("upscale") / "x4"
    write_diffusers_folder(folder, "x4-upscaler", SPEC, oracles, text_5x=False)
    return folder


@pytest.fixture(scope="module")
def model(folder) -> StableDiffusion:
    return openldm.load(folder)


@pytest.fixture(scope="module")
def pipe(folder) -> Any:
    tokenizer = transformers.CLIPTokenizer(
        str(folder / "tokenizer" / "vocab.json"),
        str(folder / "tokenizer" / "merges.txt"),
        pad_token=pad_token(SPEC),
        model_max_length=77,
    )
    pipe = diffusers.StableDiffusionUpscalePipeline.from_pretrained(folder, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(height: int, width: int) -> Image.Image:
    """A smooth low-res image with some structure, away from the clipping range."""
    y, x = np.mgrid[0:height, 0:width] / 16
    rgb = np.stack([np.sin(6 * x) * 0.4 + 0.5, 0.2 + y / 2, 0.3 + 0.2 * np.cos(5 * x * y)], axis=-1)
    return Image.fromarray((rgb.clip(0, 1) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def low_res() -> Image.Image:
    return _image(16, 24)


def _check_pixels(name: str, ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    assert ((theirs > 0.02) & (theirs < 0.98)).mean() > 0.5, "images are saturated: the test is vacuous"
    assert theirs.std() > 0.05
    err = float(np.abs(ours - theirs).max())
    ERRORS[name] = err
    assert err <= PIXEL_TOL, f"{name}: max abs pixel error {err:.2e} > {PIXEL_TOL}"


# --- parity with diffusers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sampler", "scheduler", "noise_level"),
    [("ddim", "DDIMScheduler", 20), ("euler_a", "EulerAncestralDiscreteScheduler", 150)],
)
def test_matches_diffusers(model, pipe, low_res, sampler: str, scheduler: str, noise_level: int) -> None:
    cls = getattr(diffusers, scheduler)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, timestep_spacing=SAMPLERS[sampler].spacing)
    ours = upscale(
        model,
        PROMPT,
        low_res,
        NEGATIVE,
        noise_level=noise_level,
        steps=6,
        guidance_scale=7.5,
        sampler=sampler,
        seed=31,
        n_samples=2,
        output_type="np",
        progress=False,
    )
    # One CPU generator: the low-res augmentation noise, then the latents, then the sampler's noise.
    theirs = pipe(
        PROMPT,
        image=low_res,
        negative_prompt=NEGATIVE,
        noise_level=noise_level,
        num_inference_steps=6,
        guidance_scale=7.5,
        num_images_per_prompt=2,
        generator=torch.Generator("cpu").manual_seed(31),
        output_type="np",
    ).images
    assert ours.images.shape == (2, 64, 96, 3)
    _check_pixels(f"upscale {sampler} noise level {noise_level}", ours.images, theirs)


def test_explicit_noise_matches_diffusers(model, pipe, low_res) -> None:
    """Given noise instead of a seed: ``image_noise`` is the augmentation, ``noise`` the latents."""
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    gen = torch.Generator("cpu").manual_seed(5)
    image_noise, noise = (
        torch.randn([1, 3, 16, 24], generator=gen),
        torch.randn([1, 4, 16, 24], generator=gen),
    )
    ours = upscale(
        model,
        PROMPT,
        low_res,
        steps=4,
        seed=0,
        noise=noise,
        image_noise=image_noise,
        output_type="np",
        progress=False,
    )
    theirs = pipe(
        PROMPT,
        image=low_res,
        num_inference_steps=4,
        guidance_scale=9.0,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="np",
    ).images
    _check_pixels("upscale explicit noise", ours.images, theirs)


# --- the low-res schedule ------------------------------------------------------------------------


def _diffusers_alphas(**config: Any) -> torch.Tensor:
    return diffusers.DDPMScheduler(**config).alphas_cumprod.double()


def test_schedule_from_the_folder(model) -> None:
    schedule = low_res_schedule(model)
    assert schedule.max_noise_level == 350
    expected = _diffusers_alphas(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02)
    assert torch.allclose(schedule.alphas_cumprod, expected, rtol=1e-6)


def test_schedule_reads_diffusers_defaults_and_rejects_unknown(tmp_path, model) -> None:
    """A bare config means DDPMScheduler's defaults (linear betas), as diffusers reads it."""
    folder = tmp_path / "x4"
    (folder / "low_res_scheduler").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"max_noise_level": 250}))
    config = folder / "low_res_scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    view = StableDiffusion(
        model.spec, model.unet, model.vae, model.text_encoder, model.tokenizer, {}, str(folder)
    )
    schedule = low_res_schedule(view)
    assert schedule.max_noise_level == 250
    assert torch.allclose(schedule.alphas_cumprod, _diffusers_alphas(), rtol=1e-6)
    config.write_text(json.dumps({"beta_schedule": "squaredcos_cap_v2"}))
    with pytest.raises(ValueError, match="squaredcos_cap_v2"):
        low_res_schedule(view)


def test_schedule_of_a_single_file_and_of_the_reference(tmp_path, oracles, model, low_res) -> None:
    """A single file's low_scale_model buffers are used (the reference's schedule: equal results)."""
    reference = low_res_schedule(
        StableDiffusion(model.spec, model.unet, model.vae, model.text_encoder, model.tokenizer, {}, "")
    )
    assert reference.source == "the reference config"
    assert torch.allclose(reference.alphas_cumprod, low_res_schedule(model).alphas_cumprod, rtol=1e-12)
    sd = single_file_state_dict("x4-upscaler", SPEC, oracles)
    sd = {k: v for k, v in sd.items() if not k.startswith("low_scale_model.")}
    betas = torch.linspace(0.0001**0.5, 0.02**0.5, 1000, dtype=torch.float64) ** 2
    sd["low_scale_model.betas"] = betas.float()
    sd["low_scale_model.alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    path = tmp_path / "x4.safetensors"
    write_single_file(path, sd)
    single = openldm.load(path)
    assert low_res_schedule(single).source == "low_scale_model.alphas_cumprod"
    options = {"steps": 3, "seed": 2, "output_type": "np", "progress": False}
    a = upscale(single, PROMPT, low_res, **options)
    b = upscale(model, PROMPT, low_res, **options)
    assert np.abs(a.images - b.images).max() < 1e-4
    # Random numbers where the schedule should be: a damaged file, said so.
    single.extras["low_scale_model"] = {"alphas_cumprod": torch.randn(1000)}
    with pytest.raises(ValueError, match="not a noise schedule"):
        upscale(single, PROMPT, low_res, **options)


def test_add_noise_is_q_sample() -> None:
    ac = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    schedule = LowResSchedule(ac, 2, "test")
    image, noise = torch.full([1, 3, 2, 2], 0.5), torch.ones([1, 3, 2, 2])
    out = schedule.add_noise(image, noise, 1)
    assert torch.allclose(out, torch.full_like(out, 0.5**0.5 * 0.5 + 0.5**0.5), atol=1e-7)


# --- tiling --------------------------------------------------------------------------------------


def test_tile_layout_covers_and_overlaps() -> None:
    assert tile_starts(24, 32, 8) == [0]
    assert tile_starts(40, 16, 4) == [0, 12, 24]
    for length, tile, overlap in ((40, 16, 4), (57, 16, 8), (100, 32, 0), (33, 16, 8)):
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == length
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))
    pieces = tiles(40, 57, 16, 8)
    weight = torch.zeros(40 * 4, 57 * 4)
    for p in pieces:
        window = tile_window(p, pieces, 4)
        assert window.shape == (64, 64) and float(window.min()) > 0
        weight[p.top * 4 : (p.top + p.height) * 4, p.left * 4 : (p.left + p.width) * 4] += window
    assert float(weight.min()) > 0.99  # every output pixel covered, the windows nearly a partition of 1


def test_one_tile_is_the_untiled_result_and_several_stay_close(model) -> None:
    image = _image(24, 32)
    options = {"steps": 3, "seed": 11, "output_type": "pt", "progress": False, "noise_level": 20}
    whole = upscale(model, PROMPT, image, **options)
    one = upscale(model, PROMPT, image, tile=32, tile_overlap=8, **options)
    assert whole.images.shape == (1, 3, 96, 128)
    assert torch.equal(one.images, whole.images) and torch.equal(one.latents, whole.latents)
    several = upscale(model, PROMPT, image, tile=16, tile_overlap=8, **options)
    assert several.images.shape == whole.images.shape and several.latents.shape == (1, 4, 24, 32)
    assert "Tile size: 16, Tile overlap: 8" in several.parameters[0]
    other_seed = upscale(model, PROMPT, image, **{**options, "seed": 12})
    tiled_error = float((several.images - whole.images).abs().mean())
    seed_change = float((other_seed.images - whole.images).abs().mean())
    print(f"tiled vs untiled mean abs {tiled_error:.3e}; another seed {seed_change:.3e}")
    assert 0 < tiled_error < 0.5 * seed_change


# --- inputs --------------------------------------------------------------------------------------


def _random_model(variant: str) -> StableDiffusion:
    spec = TINY[variant]
    tokenizer = CLIPTokenizer.for_config(spec.text)
    return StableDiffusion(
        spec, UNetModel(spec.unet), AutoencoderKL(spec.vae), CLIPTextEncoder(spec.text), tokenizer
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"noise_level": 351}, "noise level must be a whole number from 0 to 350"),
        ({"noise_level": -1}, "noise level"),
        ({"noise_level": 2.5}, "noise level"),
        ({"tile": 8}, "tile must be a whole number >= 16"),
        ({"tile": 32, "tile_overlap": 17}, "tile_overlap must be"),
        ({"tile_overlap": 4}, "tile_overlap needs tile"),
        ({"steps": 0}, "steps must be"),
        ({"sampler": "nope"}, "unknown sampler"),
        ({"image": torch.zeros(1, 3, 4, 16)}, "at least 8 pixels"),
        ({"image": torch.zeros(3, 3, 16, 16)}, r"\[1, 3, H, W\]"),
        ({"noise": torch.zeros(1, 4, 8, 8)}, "noise must have shape"),
    ],
)
def test_bad_input(model, low_res, options: dict[str, Any], message: str) -> None:
    image = options.pop("image", low_res)
    with pytest.raises(ValueError, match=message):
        upscale(model, PROMPT, image, steps=options.pop("steps", 2), progress=False, **options)


def test_needs_an_upscaler(low_res) -> None:
    with pytest.raises(ValueError, match="upscale needs an x4 upscaler"):
        upscale(_random_model("sd2"), PROMPT, low_res, steps=2, progress=False)


# --- the command ---------------------------------------------------------------------------------


def _main(argv: list[Any], monkeypatch) -> int:
    """``openldm ...`` with its upscale command."""
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def low_res_file(tmp_path_factory, low_res) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "low.png"
    low_res.save(path)
    return path


def test_command_writes_upscaled_images(folder, low_res_file, tmp_path, capsys, monkeypatch) -> None:
    outdir = tmp_path / "out"
    argv = ["upscale", "--ckpt", folder, "--init-img", low_res_file, "--prompt", PROMPT, "--outdir", outdir]
    argv += ["--steps", 3, "--n_samples", 2, "--noise-level", 30, "--seed", 4, "--device", "cpu"]
    assert _main(argv, monkeypatch) == 0
    samples = sorted((outdir / "samples").iterdir())
    assert [p.name for p in samples] == ["00000.png", "00001.png"]
    assert Image.open(samples[0]).size == (96, 64)
    params = read_parameters(samples[1])
    assert params["Noise level"] == 30 and params["Seed"] == 4 and params["Size"] == "96x64"
    assert params["Steps"] == 3 and params["CFG scale"] == 9.0
    assert (outdir / "grid-0000.png").is_file()
    # The same as the API with the same settings.
    api = upscale(
        openldm.load(folder),
        PROMPT,
        low_res_file,
        steps=3,
        n_samples=2,
        noise_level=30,
        seed=4,
        progress=False,
    )
    assert np.array_equal(np.asarray(Image.open(samples[1])), np.asarray(api.images[1]))
    assert (
        _main([*argv, "--tile", 16, "--tile-overlap", 4, "--skip_grid", "--n_samples", 1], monkeypatch) == 0
    )
    assert Image.open(outdir / "samples" / "00002.png").size == (96, 64)
    assert read_parameters(outdir / "samples" / "00002.png")["Tile size"] == 16


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--noise-level", 400], "noise level must be a whole number from 0 to 350"),
        (["--noise-level", -3], "--noise-level must be >= 0"),
        (["--tile", 4], "--tile must be >= 16"),
        (["--tile", 32, "--tile-overlap", 20], "--tile-overlap must be"),
        (["--steps", 0], "--ddim_steps must be a whole number >= 1"),
        (["--sampler", "nope"], "unknown sampler"),
        (["--scale", -1], "--scale must be a finite number >= 0"),
    ],
)
def test_command_bad_input(folder, low_res_file, tmp_path, capsys, monkeypatch, extra, message) -> None:
    argv = ["upscale", "--ckpt", folder, "--init-img", low_res_file, "--outdir", tmp_path, *extra]
    assert _main(argv, monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "samples").exists()


def test_command_bad_image_and_checkpoint(folder, tmp_path, capsys, monkeypatch) -> None:
    missing = ["upscale", "--ckpt", folder, "--init-img", tmp_path / "none.png", "--outdir", tmp_path]
    assert _main(missing, monkeypatch) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert _main(["upscale", "--ckpt", folder, "--init-img", broken], monkeypatch) == 2
    assert "cannot read" in capsys.readouterr().err
    assert _main(["upscale", "--init-img", broken], monkeypatch) == 2
    assert "--ckpt" in capsys.readouterr().err


def test_schedule_from_the_yaml_low_scale_config(tmp_path, oracles, model) -> None:
    """A reference yaml's low_scale_config: its schedule for a file without buffers, its max level always."""
    sd = single_file_state_dict("x4-upscaler", SPEC, oracles)
    sd = {k: v for k, v in sd.items() if not k.startswith("low_scale_model.")}
    path = tmp_path / "x4.safetensors"
    write_single_file(path, sd)
    config = reference_yaml(SPEC)
    config["model"]["params"]["low_scale_config"] = {
        "target": "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation",
        "params": {
            "noise_schedule_config": {"linear_start": 0.0002, "linear_end": 0.03},
            "max_noise_level": 300,
        },
    }
    yaml_path = tmp_path / "x4-upscaling.yaml"
    yaml_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    schedule = low_res_schedule(openldm.load(path, config=yaml_path))
    assert (schedule.source, schedule.max_noise_level) == ("the yaml's low_scale_config", 300)
    expected = _diffusers_alphas(beta_schedule="scaled_linear", beta_start=0.0002, beta_end=0.03)
    assert torch.allclose(schedule.alphas_cumprod, expected, rtol=1e-6)
    # The file's own buffers win over the yaml's schedule, not over its max level.
    betas = torch.linspace(0.0001**0.5, 0.02**0.5, 1000, dtype=torch.float64) ** 2
    write_single_file(path, {**sd, "low_scale_model.betas": betas.float()})
    schedule = low_res_schedule(openldm.load(path, config=yaml_path))
    assert (schedule.source, schedule.max_noise_level) == ("low_scale_model.betas", 300)
    with pytest.raises(ValueError, match="from 0 to 300"):
        upscale(openldm.load(path, config=yaml_path), PROMPT, Image.new("RGB", (16, 16)), noise_level=320)
    config["model"]["params"]["low_scale_config"]["params"]["max_noise_level"] = "high"
    yaml_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(UnknownArchitectureError, match="not a number"):
        openldm.load(path, config=yaml_path)
