"""unCLIP image variations: the CLIP image tower against transformers, CLIP preprocessing against
``CLIPImageProcessor``, the whole pipeline against diffusers' ``StableUnCLIPImg2ImgPipeline`` on tiny
random weights (from the same diffusers folder, and from the equivalent original single file), and the
``openldm variations`` command.

Parity is measured in pixel space, [0, 1] floats; run with ``-s`` to see the errors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import openldm
import openldm.cli
from openldm.checkpoints.formats.clip_vision import (
    infer_vision_config,
    vision_config_from_transformers,
    vision_from_transformers,
    vision_to_transformers,
)
from openldm.checkpoints.read import read_state_dict
from openldm.images import read_parameters
from openldm.nn.clip_vision import CLIPVisionEncoder, VisionConfig, preprocess
from openldm.pipelines.image_embedding import cosine_alphas_cumprod, image_embedder
from openldm.pipelines.variations import variations
from tests.helpers import assert_close_rel
from tests.oracles import (
    Oracles,
    pad_token,
    single_file_state_dict,
    text_oracle,
    unet_oracle,
    vae_oracle,
    vision_oracle,
    write_diffusers_folder,
    write_single_file,
    write_unclip_extras,
)
from tests.tiny import TINY

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SPEC = TINY["unclip"]
# Projection width 32: the UNet's adm_in_channels (64) is the embedding plus its noise-level embedding.
# One head per 64 channels, the rule the loader uses when no config.json says otherwise.
VISION = VisionConfig(
    width=64, layers=2, heads=1, mlp_width=128, patch_size=8, image_size=32, embed_dim=32, activation="gelu"
)
SIZE = 64
PIXEL_TOL = 1e-3
ERRORS: dict[str, float] = {}


pytestmark = pytest.mark.usefixtures("single_thread")


def picture(width: int = 80, height: int = 56) -> Image.Image:
    """A smooth, non-square image with structure."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([np.sin(7 * x) * 0.5 + 0.5, y, (x * y) ** 0.5], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


# --- the image tower and the preprocessing ---------------------------------------------------------


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_vision_tower_matches_transformers(activation: str) -> None:
    config = dataclasses.replace(VISION, heads=2, activation=activation)
    oracle = vision_oracle(config)
    ours = CLIPVisionEncoder(config).eval()
    sd = vision_from_transformers(oracle.state_dict())
    ours.load_state_dict(sd, strict=True)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = oracle(pixel_values=pixels).image_embeds
        actual = ours(pixels)
    assert expected.abs().max() > 0.5
    err = float((actual - expected).abs().max() / expected.abs().max())
    ERRORS[f"vision tower {activation} rel"] = err
    assert_close_rel(actual, expected, 1e-4)
    # The maps are inverse to each other, and the config round-trips through transformers' config.
    assert {k: v.shape for k, v in vision_to_transformers(sd).items()} == {
        k: v.shape for k, v in oracle.state_dict().items() if not k.endswith("position_ids")
    }
    assert all(
        torch.equal(vision_to_transformers(sd)[k], v)
        for k, v in oracle.state_dict().items()
        if not k.endswith("position_ids")
    )
    assert vision_config_from_transformers(oracle.config.to_dict()) == config
    assert infer_vision_config(sd, activation) == dataclasses.replace(config, heads=1)


@pytest.mark.parametrize("size", [(80, 56), (56, 80), (224, 224), (301, 250), (19, 23)])
def test_preprocess_matches_clip_image_processor(size: tuple[int, int]) -> None:
    image = picture(*size)
    processor = transformers.CLIPImageProcessor()
    expected = torch.from_numpy(np.asarray(processor(images=image, return_tensors="np").pixel_values))
    actual = preprocess(image)
    assert actual.shape == (1, 3, 224, 224) and actual.dtype == torch.float32
    assert torch.equal(actual, expected)


def test_preprocess_rejects_non_images() -> None:
    with pytest.raises(ValueError, match="PIL image"):
        preprocess([])


def test_cosine_schedule_matches_diffusers() -> None:
    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    ours = cosine_alphas_cumprod()
    assert_close_rel(ours.float(), scheduler.alphas_cumprod, 1e-6)
    assert 0.99995 < float(ours[0]) < 1 and float(ours[-1]) < 1e-6


# --- the pipeline ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("variations")
    folder = root / "unclip"
    oracles = Oracles(unet_oracle(SPEC.unet), vae_oracle(SPEC.vae), text_oracle(SPEC.text))
    write_diffusers_folder(folder, "unclip", SPEC, oracles, text_5x=False)
    encoder = vision_oracle(VISION)
    gen = torch.Generator().manual_seed(3)
    mean = 0.3 * torch.randn(1, VISION.embed_dim, generator=gen)
    std = 0.5 + torch.rand(1, VISION.embed_dim, generator=gen)
    write_unclip_extras(folder, encoder, mean, std, VISION.image_size)

    # The same weights as an original single file.
    sd = {
        k: v
        for k, v in single_file_state_dict("unclip", SPEC, oracles).items()
        if not k.startswith(("embedder.", "noise_augmentor."))
    }
    ours = vision_from_transformers(encoder.state_dict())
    sd |= {f"embedder.model.visual.{k}": v.clone() for k, v in ours.items()}
    sd["embedder.model.logit_scale"] = torch.tensor(4.6)  # OpenCLIP keeps it: not part of the image tower
    alphas = cosine_alphas_cumprod()
    sd |= {
        "noise_augmentor.data_mean": mean.clone(),
        "noise_augmentor.data_std": std.clone(),
        "noise_augmentor.alphas_cumprod": alphas.float(),
        "noise_augmentor.sqrt_alphas_cumprod": alphas.sqrt().float(),
    }
    single = root / "unclip.safetensors"
    write_single_file(single, sd)

    tokenizer = transformers.CLIPTokenizer(
        str(folder / "tokenizer" / "vocab.json"),
        str(folder / "tokenizer" / "merges.txt"),
        pad_token=pad_token(SPEC),
        model_max_length=77,
    )
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", sample_size=SIZE // 8)
    pipe = diffusers.StableUnCLIPImg2ImgPipeline.from_pretrained(folder, tokenizer=tokenizer, unet=unet)
    pipe.set_progress_bar_config(disable=True)
    return {
        "folder": folder,
        "single": single,
        "model": openldm.load(folder),
        "single_model": openldm.load(single, prediction_type="v"),
        "pipe": pipe,
        "root": root,
    }


def _check_pixels(name: str, ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    assert ((theirs > 0.02) & (theirs < 0.98)).mean() > 0.5, "images are saturated: the test is vacuous"
    assert theirs.std() > 0.05
    err = float(np.abs(ours - theirs).max())
    ERRORS[f"pixel max abs {name}"] = err
    assert err <= PIXEL_TOL, f"{name}: max abs pixel error {err:.2e} > {PIXEL_TOL}"


def _theirs(pipe: Any, seed: int, noise_level: int, scale: float, n: int, prompt: str = "") -> np.ndarray:
    # diffusers draws the embedding noise first, then the latents: the same order as ours.
    return pipe(
        picture(),
        prompt=prompt,
        negative_prompt="blurry",
        height=SIZE,
        width=SIZE,
        num_inference_steps=6,
        guidance_scale=scale,
        noise_level=noise_level,
        num_images_per_prompt=n,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).images


@pytest.mark.parametrize(
    ("source", "noise_level", "scale", "n"),
    [("folder", 0, 10.0, 1), ("folder", 400, 5.0, 2), ("single", 250, 10.0, 1)],
)
def test_variations_match_diffusers(setup, source: str, noise_level: int, scale: float, n: int) -> None:
    model = setup["model" if source == "folder" else "single_model"]
    prompt = "a lighthouse" if n > 1 else ""
    ours = variations(
        model,
        picture(),
        prompt,
        "blurry",
        noise_level=noise_level,
        steps=6,
        guidance_scale=scale,
        width=SIZE,
        height=SIZE,
        seed=21,
        n_samples=n,
        output_type="np",
        progress=False,
    )
    theirs = _theirs(setup["pipe"], 21, noise_level, scale, n, prompt)
    _check_pixels(f"{source} level {noise_level} scale {scale}", ours.images, theirs)


def test_embedding_conditioning_matters(setup) -> None:
    """Another image, or another noise level, gives another result (the y path is live)."""
    model = setup["model"]
    options = {"steps": 3, "width": 32, "height": 32, "seed": 4, "output_type": "latent", "progress": False}
    base = variations(model, picture(), **options).latents
    other = variations(model, picture().transpose(Image.Transpose.ROTATE_90), **options).latents
    noisier = variations(model, picture(), noise_level=900, **options).latents
    again = variations(model, picture(), **options).latents
    assert torch.equal(base, again)
    for changed in (other, noisier):
        assert (changed - base).abs().max() > 1e-3 * base.abs().max()


def test_embedder_from_single_file_equals_folder(setup) -> None:
    folder, single = image_embedder(setup["model"]), image_embedder(setup["single_model"])
    assert folder.encoder.config == single.encoder.config
    image = picture()
    assert torch.equal(folder.embed(image), single.embed(image))
    assert torch.equal(folder.mean, single.mean) and torch.equal(folder.std, single.std)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"noise_level": 1000}, "noise_level must be a whole number from 0 to 999"),
        ({"noise_level": -1}, "noise_level must be"),
        ({"steps": 0}, "steps must be a whole number >= 1"),
        ({"width": 60}, "width must be a positive multiple of 8"),
        ({"sampler": "nope"}, "unknown sampler"),
        ({"image_embeds": torch.zeros(1, 5)}, r"image_embeds must have shape \[1, 32\]"),
    ],
)
def test_variations_reject_bad_input(setup, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        variations(setup["model"], picture(), **{"steps": 2, "progress": False, **options})


def test_variations_need_an_unclip_model_and_an_image(setup, tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        variations(setup["model"], tmp_path / "missing.png", steps=2, progress=False)
    sd1 = dataclasses.replace(setup["model"], spec=dataclasses.replace(TINY["sd2"], variant="sd2"))
    with pytest.raises(ValueError, match="need an unCLIP model"):
        variations(sd1, picture(), steps=2, progress=False)


# --- the command -------------------------------------------------------------------------------


def _main(argv: list[str], monkeypatch) -> int:
    """``openldm`` with its variations command."""
    return openldm.cli.main(argv)


def test_command_writes_images_with_parameters(setup, tmp_path, monkeypatch) -> None:
    init = tmp_path / "in.png"
    picture().save(init)
    out = tmp_path / "out"
    argv = [
        "variations",
        "--ckpt",
        str(setup["folder"]),
        "--init-img",
        str(init),
        "--outdir",
        str(out),
        "--noise-level",
        "100",
        "--ddim_steps",
        "3",
        "--H",
        "32",
        "--W",
        "32",
        "--n_samples",
        "2",
        "--seed",
        "5",
    ]
    assert _main(argv, monkeypatch) == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert (out / "grid-0000.png").is_file()
    params = read_parameters(out / "samples" / "00001.png")
    assert params["Noise level"] == 100 and params["Steps"] == 3 and params["CFG scale"] == 10.0
    assert params["Seed"] == 5 and params["Size"] == "32x32" and params["Sampler"] == "DDIM"
    # The same as the Python API.
    api = variations(
        setup["model"],
        picture(),
        noise_level=100,
        steps=3,
        width=32,
        height=32,
        seed=5,
        n_samples=2,
        progress=False,
    )
    saved = np.asarray(Image.open(out / "samples" / "00001.png"))
    assert np.array_equal(saved, np.asarray(api.images[1]))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--noise-level", "1000"], "--noise-level must be between 0 and 999"),
        (["--H", "36"], "--H must be a positive multiple of 8"),
        (["--ddim_steps", "0"], "--ddim_steps must be a whole number >= 1"),
        (["--sampler", "nope"], "unknown sampler 'nope'"),
        (["--init-img", "missing.png"], "does not exist"),
        (["--init-img", "__not_an_image__"], "cannot read --init-img"),
        (["--ckpt", "__sd2__"], "is a sd2 model; variations need an unCLIP model"),
    ],
)
def test_command_rejects_bad_input(
    setup, tmp_path, monkeypatch, capsys, extra: list[str], message: str
) -> None:
    init = tmp_path / "in.png"
    picture().save(init)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    extra = [str(broken) if e == "__not_an_image__" else e for e in extra]
    if "__sd2__" in extra:
        sd2 = tmp_path / "sd2"
        spec = TINY["sd2"]
        write_diffusers_folder(
            sd2,
            "sd2",
            spec,
            Oracles(unet_oracle(spec.unet), vae_oracle(spec.vae), text_oracle(spec.text)),
            text_5x=False,
        )
        extra = [str(sd2) if e == "__sd2__" else e for e in extra]
    argv = [
        "variations",
        "--ckpt",
        str(setup["folder"]),
        "--init-img",
        str(init),
        "--ddim_steps",
        "2",
        "--H",
        "32",
        "--W",
        "32",
        "--outdir",
        str(tmp_path / "out"),
        *extra,
    ]
    assert _main(argv, monkeypatch) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "samples").exists() or not any((tmp_path / "out" / "samples").iterdir())


def test_command_help(monkeypatch, capsys) -> None:
    assert _main(["variations", "--help"], monkeypatch) == 0
    text = capsys.readouterr().out
    assert "--noise-level" in text and "--init-img" in text and "default: 10.0" in text


def test_embedder_activation_rule() -> None:
    from openldm.checkpoints.formats.clip_vision import embedder_activation

    def conv(width: int) -> dict[str, torch.Tensor]:
        return {"model.visual.conv1.weight": torch.zeros(width, 3, 1, 1)}

    assert embedder_activation(conv(1280)) == "gelu"  # OpenCLIP ViT-H/14
    assert embedder_activation(conv(1024)) == "quick_gelu"  # OpenAI ViT-L/14
    assert embedder_activation(conv(64) | {"model.transformer.resblocks.0.ln_1.weight": torch.ones(1)}) == (
        "quick_gelu"
    )
    assert embedder_activation(conv(64) | {"model.token_embedding.weight": torch.ones(1)}) == "gelu"


def test_embedding_stats_file_stands_in_for_missing_statistics(setup, tmp_path, capsys) -> None:
    # A single file without noise_augmentor.data_mean/std (as the reference's CLIP-L one, which reads
    # ViT-L-14_stats.th; this tiny tower counts as -h, whose missing statistics mean no normalisation).
    sd = read_state_dict(setup["single"])
    mean, std = sd.pop("noise_augmentor.data_mean"), sd.pop("noise_augmentor.data_std")
    bare = tmp_path / "no-stats.safetensors"
    write_single_file(bare, sd)
    torch.save((mean, std), tmp_path / "ViT-L-14_stats.th")
    init = tmp_path / "in.png"
    picture().save(init)
    argv = ["variations", "--ckpt", str(bare), "--init-img", str(init), "--ddim_steps", "2"]
    argv += ["--H", "32", "--W", "32", "--n_samples", "1", "--seed", "3"]

    def changed(outdir: str) -> float:
        """The fraction of the first image's bytes that differ from the complete file's (and their max)."""
        first, reference = (
            np.asarray(Image.open(tmp_path / name / "samples" / "00000.png")).astype(int)
            for name in (outdir, "complete")
        )
        assert np.abs(first - reference).max() <= (1 if outdir == "out" else 255)
        return float((first != reference).mean())

    # The same command on the complete file is the reference: the same float32 weights and statistics,
    # but memory-mapped at other offsets of another file, and a CPU's matrix kernels may round the last
    # bit differently for differently aligned operands (seen on AVX2). A byte (truncated, as the
    # reference writes it) then moves by one level where its value sits on a level's edge. So: at most
    # one level apart, in a few bytes; without the statistics the embedding is not normalised and much
    # of the image changes (930 of 3072 bytes here, against 2 with them).
    complete = [*argv[:2], str(setup["single"]), *argv[3:]]
    assert openldm.cli.main([*complete, "--outdir", str(tmp_path / "complete")]) == 0
    assert openldm.cli.main([*argv, "--outdir", str(tmp_path / "none")]) == 0
    stats = ["--embedding-stats", str(tmp_path / "ViT-L-14_stats.th")]
    assert openldm.cli.main([*argv, *stats, "--outdir", str(tmp_path / "out")]) == 0
    assert changed("out") < 0.01 and changed("none") > 0.1

    torch.save({"mean": mean}, tmp_path / "wrong.th")
    assert openldm.cli.main([*argv, "--embedding-stats", str(tmp_path / "wrong.th")]) == 2
    assert "does not hold a (mean, std) pair" in capsys.readouterr().err
