"""depth2img on tiny random weights against diffusers' StableDiffusionDepth2ImgPipeline (depth map given,
same scheduler, same generator), the depth map's reading and normalisation, the MiDaS DPT-hybrid
estimator against transformers' DPTForDepthEstimation, and the ``openldm depth2img`` command.

Parity is measured in pixel space, [0, 1] floats; run with ``-s`` to see the errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import openldm
from openldm import cli
from openldm.checkpoints.extras import midas_estimator
from openldm.checkpoints.formats.midas import midas_from_transformers
from openldm.images import read_parameters
from openldm.nn.midas import MiDaSConfig, MiDaSDepthEstimator
from openldm.pipelines.depth2img import (
    MissingDepthEstimatorError,
    depth2img,
    estimate_depth,
    normalize_depth,
    read_depth_map,
)
from openldm.pipelines.depth_estimate import midas_input_size
from openldm.sampling.samplers import SAMPLERS
from tests.helpers import assert_close_rel
from tests.oracles import (
    Oracles,
    dpt_hybrid_config,
    pad_token,
    randomize_,
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

SIZE = 64
PROMPT = "a cozy wooden cabin interior"
NEGATIVE = "blurry"
PIXEL_TOL = 1e-3
ERRORS: dict[str, float] = {}
# A tiny DPT-hybrid: the real structure (3 ResNet stages, readout projection, 4 fusion blocks) at a size
# that runs in a fraction of a second; 64-wide heads as the loader infers them.
TINY_MIDAS = MiDaSConfig(
    image_size=64,
    width=64,
    layers=4,
    heads=1,
    mlp_width=128,
    hooks=(2, 3),
    stem_width=32,
    stage_depths=(1, 1, 2),
    stage_widths=(128, 256, 512),
    features=32,
    num_classes=10,
)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def oracles() -> Oracles:
    spec = TINY["depth"]
    return Oracles(unet_oracle(spec.unet), vae_oracle(spec.vae), text_oracle(spec.text))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, oracles) -> Path:
    folder = tmp_path_factory.mktemp("depth") / "depth"
    write_diffusers_folder(folder, "depth", TINY["depth"], oracles, text_5x=False)
    return folder


@pytest.fixture(scope="module")
def model(folder) -> Any:
    return openldm.load(folder)


@pytest.fixture(scope="module")
def pipe(folder) -> Any:
    """diffusers' depth pipeline from the same folder (its depth_estimator there is a stub: not loaded)."""
    tokenizer = transformers.CLIPTokenizer(
        str(folder / "tokenizer" / "vocab.json"),
        str(folder / "tokenizer" / "merges.txt"),
        pad_token=pad_token(TINY["depth"]),
        model_max_length=77,
    )
    pipe = diffusers.StableDiffusionDepth2ImgPipeline(
        vae=diffusers.AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=transformers.CLIPTextModel.from_pretrained(folder / "text_encoder"),
        tokenizer=tokenizer,
        unet=diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", sample_size=SIZE // 8),
        scheduler=diffusers.DDIMScheduler.from_pretrained(folder / "scheduler"),
        depth_estimator=None,
        feature_extractor=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def init_image() -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    rgb = np.stack([np.sin(6 * x) * 0.5 + 0.5, y, (x * y) ** 0.5], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def _depth(height: int = 48, width: int = 40, batch: int = 1) -> np.ndarray:
    """A smooth depth map (a slanted floor with a bump), not at the latent size."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    maps = [
        10.0 + 30.0 * y / height + 20.0 * np.exp(-((x - width / (2 + i)) ** 2 + (y - height / 2) ** 2) / 80.0)
        for i in range(batch)
    ]
    return np.stack(maps).astype(np.float32)


def _check_pixels(name: str, ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    assert ((theirs > 0.02) & (theirs < 0.98)).mean() > 0.5, "images are saturated: the test is vacuous"
    err = float(np.abs(ours - theirs).max())
    ERRORS[name] = err
    assert err <= PIXEL_TOL, f"{name}: max abs pixel error {err:.2e} > {PIXEL_TOL}"


# --- parity with diffusers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sampler", "scheduler", "n"), [("ddim", "DDIMScheduler", 1), ("euler", "EulerDiscreteScheduler", 1)]
)
def test_matches_diffusers_with_depth_map(
    model, pipe, init_image, sampler: str, scheduler: str, n: int
) -> None:
    pipe.scheduler = getattr(diffusers, scheduler).from_config(
        pipe.scheduler.config, timestep_spacing=SAMPLERS[sampler].spacing
    )
    depth = _depth()
    ours = depth2img(
        model,
        PROMPT,
        init_image,
        NEGATIVE,
        depth_map=depth,
        strength=0.7,
        steps=8,
        guidance_scale=6.0,
        sampler=sampler,
        seed=21,
        n_samples=n,
        output_type="np",
        progress=False,
    )
    theirs = pipe(
        PROMPT,
        image=init_image,
        depth_map=torch.from_numpy(depth),
        negative_prompt=NEGATIVE,
        strength=0.7,
        num_inference_steps=8,
        guidance_scale=6.0,
        num_images_per_prompt=n,
        generator=torch.Generator("cpu").manual_seed(21),
        output_type="np",
    ).images
    _check_pixels(f"depth2img {sampler}", ours.images, theirs)
    # The depth channel matters: another map gives another image.
    flat = depth2img(
        model,
        PROMPT,
        init_image,
        NEGATIVE,
        depth_map=depth.transpose(0, 2, 1).copy(),
        strength=0.7,
        steps=8,
        guidance_scale=6.0,
        sampler=sampler,
        seed=21,
        n_samples=n,
        output_type="np",
        progress=False,
    )
    assert np.abs(flat.images - ours.images).max() > 10 * PIXEL_TOL


def test_normalisation_is_the_references(pipe) -> None:
    depth = torch.from_numpy(_depth(batch=2))
    ours = normalize_depth(depth, (8, 8))
    # The reference's scripts: bicubic to the latent size, then 2 (d - min) / (max - min) - 1 per image.
    resized = F.interpolate(depth[:, None], size=(8, 8), mode="bicubic", align_corners=False).numpy()
    for i in range(2):
        d = resized[i]
        expected = 2.0 * (d - d.min()) / (d.max() - d.min()) - 1.0
        np.testing.assert_allclose(ours[i].numpy(), expected, rtol=0, atol=1e-6)
        assert ours[i].min() == -1.0 and ours[i].max() == 1.0
    theirs = pipe.prepare_depth_map(
        Image.new("RGB", (SIZE, SIZE)), depth, 2, False, torch.float32, torch.device("cpu")
    )
    assert_close_rel(ours, theirs, 1e-6)
    # A map with no depth information is -1 everywhere, not NaN.
    assert torch.equal(normalize_depth(torch.full((1, 5, 5), 3.0), (2, 2)), torch.full((1, 1, 2, 2), -1.0))


def test_depth_map_from_files(tmp_path) -> None:
    depth = _depth()[0]
    np.save(tmp_path / "d.npy", depth)
    assert torch.equal(read_depth_map(tmp_path / "d.npy"), torch.from_numpy(depth)[None])
    # A 16-bit PNG keeps its values; an 8-bit one is read as luminance.
    wide = (depth * 1000).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "d16.png")
    assert torch.equal(
        read_depth_map(str(tmp_path / "d16.png")), torch.from_numpy(wide.astype(np.float32))[None]
    )
    gray = depth.astype(np.uint8)
    Image.fromarray(gray).convert("RGB").save(tmp_path / "d8.png")
    assert torch.equal(read_depth_map(tmp_path / "d8.png"), torch.from_numpy(gray.astype(np.float32))[None])
    # Tensors of the accepted shapes.
    t = torch.from_numpy(depth)
    for shaped in (t, t[None], t[None, None]):
        assert read_depth_map(shaped).shape == (1, 48, 40)
    for bad, match in (
        (tmp_path / "missing.npy", "does not exist"),
        (np.zeros((2, 3, 4, 5), np.float32), "shaped"),
        (np.array([[np.nan, 1.0]]), "NaN"),
        (42, "must be"),
    ):
        with pytest.raises(ValueError, match=match):
            read_depth_map(bad)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        read_depth_map(tmp_path / "junk.png")


def test_map_from_npy_equals_array(model, init_image, tmp_path) -> None:
    depth = _depth()
    np.save(tmp_path / "d.npy", depth[0])
    options = {"steps": 4, "seed": 3, "strength": 0.5, "output_type": "latent", "progress": False}
    a = depth2img(model, PROMPT, init_image, depth_map=depth, **options)
    b = depth2img(model, PROMPT, init_image, depth_map=tmp_path / "d.npy", **options)
    assert torch.equal(a.latents, b.latents)
    with pytest.raises(ValueError, match="batch"):
        depth2img(model, PROMPT, init_image, depth_map=_depth(batch=3), n_samples=2, **options)
    with pytest.raises(ValueError, match="strength"):
        depth2img(model, PROMPT, init_image, depth_map=depth, **{**options, "strength": 1.2})


# --- the estimator -----------------------------------------------------------------------------


def test_estimator_matches_transformers_dpt_hybrid() -> None:
    torch.manual_seed(0)
    hf = randomize_(transformers.DPTForDepthEstimation(dpt_hybrid_config(TINY_MIDAS, 64)), 3)
    ours = midas_estimator(midas_from_transformers(hf.state_dict()))
    assert ours.config == MiDaSConfig(**{**TINY_MIDAS.__dict__, "num_classes": 0})
    x = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1).clamp(-1, 1)
    with torch.no_grad():
        expected = hf(pixel_values=x).predicted_depth
        actual = ours(x)
    assert expected.std() > 0.1
    ERRORS["estimator vs transformers (rel)"] = float((actual - expected).abs().max() / expected.abs().max())
    assert_close_rel(actual, expected, 1e-4)
    # Other sizes (multiples of 32): position embeddings resized, output at the input size.
    assert ours(torch.zeros(1, 3, 96, 64)).shape == (1, 96, 64)
    with pytest.raises(ValueError, match="multiples of 32"):
        ours(torch.zeros(1, 3, 72, 64))


def test_real_dpt_hybrid_keys_and_shapes() -> None:
    """The released dpt_hybrid's layout (the reference's names) is what transformers' converter expects."""
    with torch.device("meta"):
        ours = MiDaSDepthEstimator(MiDaSConfig()).state_dict()
        hf = transformers.DPTForDepthEstimation(dpt_hybrid_config(MiDaSConfig(), 384)).state_dict()
    converted = midas_from_transformers(hf)
    head = {"model.pretrained.model.head.weight", "model.pretrained.model.head.bias"}
    assert set(ours) - head == set(converted)
    assert all(ours[k].shape == converted[k].shape for k in converted)
    shapes = {
        "model.pretrained.model.cls_token": (1, 1, 768),
        "model.pretrained.model.pos_embed": (1, 577, 768),
        "model.pretrained.model.patch_embed.backbone.stem.conv.weight": (64, 3, 7, 7),
        "model.pretrained.model.patch_embed.backbone.stages.2.blocks.8.conv3.weight": (1024, 256, 1, 1),
        "model.pretrained.model.patch_embed.proj.weight": (768, 1024, 1, 1),
        "model.pretrained.model.blocks.11.attn.qkv.weight": (2304, 768),
        "model.pretrained.model.head.weight": (1000, 768),
        "model.pretrained.act_postprocess3.0.project.0.weight": (768, 1536),
        "model.pretrained.act_postprocess4.4.weight": (768, 768, 3, 3),
        "model.scratch.layer1_rn.weight": (256, 256, 3, 3),
        "model.scratch.refinenet4.resConfUnit1.conv1.weight": (256, 256, 3, 3),
        "model.scratch.output_conv.4.weight": (1, 32, 1, 1),
    }
    assert {k: tuple(ours[k].shape) for k in shapes} == shapes
    assert not any("act_postprocess1" in k or "act_postprocess2" in k for k in ours)


@pytest.fixture(scope="module")
def single_files(tmp_path_factory, oracles) -> dict[str, Path]:
    """The depth model as an original single file, with and without a (tiny) MiDaS estimator."""
    root = tmp_path_factory.mktemp("depth-single")
    sd = {
        k: v
        for k, v in single_file_state_dict("depth", TINY["depth"], oracles).items()
        if not k.startswith("depth_model.")
    }
    torch.manual_seed(0)
    estimator = randomize_(MiDaSDepthEstimator(TINY_MIDAS), 5)
    paths = {"plain": root / "plain.safetensors", "midas": root / "midas.safetensors"}
    write_single_file(paths["plain"], sd)
    midas = {f"depth_model.{k}": v.contiguous() for k, v in estimator.state_dict().items()}
    write_single_file(paths["midas"], {**sd, **midas})
    return paths


def test_estimated_depth_from_the_checkpoint(single_files, init_image) -> None:
    model = openldm.load(single_files["midas"])
    assert set(model.extras) == {"depth_model"}
    pixels = torch.from_numpy(np.asarray(init_image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    raw = estimate_depth(model, pixels)
    assert raw.shape == (1, 384, 384) and raw.std() > 0  # upsampled to MiDaS's 384 as the reference
    options = {"steps": 4, "seed": 8, "output_type": "latent", "progress": False}
    estimated = depth2img(model, PROMPT, init_image, **options)
    given = depth2img(model, PROMPT, init_image, depth_map=raw, **options)
    assert torch.equal(estimated.latents, given.latents)
    assert "Depth map: MiDaS" in estimated.parameters[0]


def test_no_map_and_no_estimator(single_files, model, init_image) -> None:
    # A single file without depth_model.*, and a diffusers folder whose depth_estimator is unreadable.
    for loaded, why in ((openldm.load(single_files["plain"]), "no depth estimator"), (model, "not a MiDaS")):
        with pytest.raises(MissingDepthEstimatorError, match=f"{why}.*depth_map="):
            depth2img(loaded, PROMPT, init_image, steps=2, progress=False)


def test_midas_input_size_is_the_references() -> None:
    # keep_aspect_ratio, ensure_multiple_of=32, resize_method="minimal", 384x384.
    assert midas_input_size(512, 512) == (384, 384)
    assert midas_input_size(512, 768) == (384, 576)
    assert midas_input_size(768, 512) == (576, 384)
    assert midas_input_size(64, 64) == (384, 384)


# --- the command -------------------------------------------------------------------------------


def _main(monkeypatch, argv: list[str]) -> int:
    """``openldm`` with its ``depth2img`` command."""
    return cli.main(argv)


def test_command_end_to_end(monkeypatch, folder, single_files, init_image, tmp_path, capsys) -> None:
    init_image.save(tmp_path / "init.png")
    np.save(tmp_path / "depth.npy", _depth()[0])
    base = ["depth2img", "--init-img", str(tmp_path / "init.png"), "--prompt", PROMPT, "--ddim_steps", "4"]
    base += ["--n_iter", "1", "--device", "cpu"]
    out = tmp_path / "out"
    status = _main(
        monkeypatch,
        [*base, "--ckpt", str(folder), "--depth-map", str(tmp_path / "depth.npy"), "--outdir", str(out)],
    )
    assert status == 0, capsys.readouterr().err
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png"]
    params = read_parameters(out / "samples" / "00000.png")
    assert (
        params["Denoising strength"] == 0.8 and params["CFG scale"] == 9.0 and params["Depth map"] == "given"
    )
    assert (out / "grid-0000.png").is_file()
    # Without a map: the checkpoint's estimator.
    out2 = tmp_path / "out2"
    status = _main(
        monkeypatch, [*base, "--ckpt", str(single_files["midas"]), "--outdir", str(out2), "--skip_grid"]
    )
    assert status == 0, capsys.readouterr().err
    assert read_parameters(out2 / "samples" / "00000.png")["Depth map"] == "MiDaS"


def test_command_bad_input(monkeypatch, folder, single_files, init_image, tmp_path, capsys) -> None:
    init_image.save(tmp_path / "init.png")
    (tmp_path / "junk.npy").write_bytes(b"junk")
    base = [
        "depth2img",
        "--prompt",
        "x",
        "--ddim_steps",
        "2",
        "--outdir",
        str(tmp_path / "o"),
        "--device",
        "cpu",
    ]
    init = ["--init-img", str(tmp_path / "init.png")]
    cases = [
        ([*init, "--ckpt", str(folder), "--strength", "1.5"], "--strength"),
        (["--init-img", str(tmp_path / "nope.png"), "--ckpt", str(folder)], "does not exist"),
        ([*init, "--ckpt", str(folder), "--depth-map", str(tmp_path / "nope.npy")], "does not exist"),
        ([*init, "--ckpt", str(folder), "--depth-map", str(tmp_path / "junk.npy")], "cannot read depth map"),
        ([*init, "--ckpt", str(single_files["plain"])], "--depth-map"),
        ([*init, "--ckpt", str(folder), "--depth-map", str(tmp_path / "init.png"), "--H", "60"], "--H"),
        ([*init, "--ckpt", str(folder), "--sampler", "nope"], "unknown sampler"),
        (init, "--depth-map"),  # the embedded depth variant carries no estimator
        (["--ckpt", str(folder)], "--init-img"),
    ]
    for args, message in cases:
        status = _main(monkeypatch, [*base, *args])
        err = capsys.readouterr().err
        assert status == 2, (args, err)
        assert message in err, (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_the_depth_preprocessor_reads_every_midas_layout(tmp_path, init_image, capsys) -> None:
    """``--control-preprocess depth``: the same control image from the released MiDaS file, a depth
    checkpoint and transformers' folder, equal to transformers' DPT depth stretched to 0..255."""
    from openldm.checkpoints.extras import read_depth_estimator
    from openldm.pipelines.depth_estimate import depth_control_image

    hf = randomize_(transformers.DPTForDepthEstimation(dpt_hybrid_config(TINY_MIDAS, 384)), 3).eval()
    reference = midas_from_transformers(hf.state_dict())
    paths = [tmp_path / "dpt_hybrid-midas.pt", tmp_path / "depth-ema.safetensors", tmp_path / "dpt"]
    torch.save({k.removeprefix("model."): v for k, v in reference.items()}, paths[0])
    write_single_file(paths[1], {f"depth_model.{k}": v.contiguous() for k, v in reference.items()})
    hf.save_pretrained(paths[2])
    images = [np.asarray(depth_control_image(read_depth_estimator(p), init_image)) for p in paths]
    assert all(np.abs(images[0].astype(int) - image).max() <= 1 for image in images[1:])

    pixels = torch.from_numpy(np.asarray(init_image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    pixels = F.interpolate(pixels, size=(384, 384), mode="bicubic", align_corners=False).clamp(-1, 1)
    with torch.no_grad():
        depth = hf(pixel_values=pixels).predicted_depth[None]
    depth = F.interpolate(depth, size=(SIZE, SIZE), mode="bicubic")[0, 0]
    expected = ((depth - depth.min()) / (depth.max() - depth.min()) * 255).numpy()
    assert images[0].std() > 20
    assert np.abs(images[0][..., 0] - expected).max() <= 1.0  # one grey level

    init_image.save(tmp_path / "room.png")
    argv = ["txt2img", "--prompt", "a red circle", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1"]
    argv += ["--skip_grid", "--control-image", str(tmp_path / "room.png"), "--control-preprocess", "depth"]
    capsys.readouterr()
    assert cli.main([*argv, "--outdir", str(tmp_path / "none")]) == 2
    assert "--control-preprocess depth needs --depth-model PATH" in capsys.readouterr().err
    assert cli.main([*argv, "--depth-model", str(paths[0]), "--outdir", str(tmp_path / "out")]) == 0
    written = next((tmp_path / "out" / "samples").iterdir())
    assert read_parameters(written)["ControlNet 0"].startswith("Module: depth, Model: embedded-controlnet [")
