"""The embedded default model: loading it with no path, the CLI without --ckpt, its golden image, its
prompt fidelity, and ``openldm eval``.

The golden image and the fidelity targets depend on the packaged weights: after new weights land,
regenerate the golden image with ``python tests/golden/make_golden.py``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import openldm
from openldm import embedded
from openldm.checkpoints import packaged
from openldm.checkpoints.errors import MissingWeightsError
from openldm.cli import main
from openldm.commands.common import DEFAULT_PROMPT, default_prompt
from openldm.commands.eval import Setting, model_generator, score_settings
from openldm.config import preset
from openldm.images import read_parameters
from tests.golden.make_golden import GOLDEN_FILE, PROMPT, SETTINGS

# Agreement with the golden image, in 0..255 levels: room for other BLAS kernels, not for a changed model.
GOLDEN_MEAN_TOLERANCE = 1.0
GOLDEN_MAX_TOLERANCE = 8.0
# The targets (percent, 25 steps, guidance 7.5) minus 10 points: the small sets are noisy.
FIDELITY_FLOORS = {
    "seen": {"colour": 80, "kind": 75, "position": 70, "count": 70},
    "held-out": {"colour": 70, "kind": 70},
}
FIDELITY_N = 24
# What the packaged model scores on these 24 + 24 images, measured when its weights landed (seen colour
# 100, kind 97.8, position 100, count 97.3; held-out 100 everywhere), minus about two images' worth
# for other BLAS kernels: a regression guard well above the targets.
SHIPPED_FLOORS = {
    "seen": {"colour": 92, "kind": 90, "position": 92, "count": 90},
    "held-out": {"colour": 92, "kind": 92, "position": 92},
}
# The trained weights are committed once, when final (issue 4); until then these tests cannot run.
needs_weights = pytest.mark.skipif(
    not (embedded.EMBEDDED_FILE.is_file() and GOLDEN_FILE.is_file()),
    reason="the embedded model's trained weights (and their golden image) are not in the package yet",
)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model() -> openldm.StableDiffusion:
    return openldm.load(dtype=torch.float32)


def run(capsys, *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def golden_difference(image: Image.Image) -> tuple[float, float]:
    """(mean, max) absolute difference from the golden image, in 0..255 levels."""
    difference = np.abs(pixels(image) - pixels(Image.open(GOLDEN_FILE)))
    return float(difference.mean()), float(difference.max())


# --- loading -----------------------------------------------------------------------------------


@needs_weights
def test_load_without_argument_is_the_packaged_model() -> None:
    model = openldm.load()
    spec = preset("embedded")
    assert model.spec == spec and model.source == str(embedded.EMBEDDED_FILE)
    # Stored fp16, loaded in float32 on the CPU (where fp16 arithmetic is slow) unless asked otherwise.
    assert next(model.unet.parameters()).dtype == torch.float32
    assert next(openldm.load(dtype=torch.float16).unet.parameters()).dtype == torch.float16
    unet_parameters = sum(p.numel() for p in model.unet.parameters())
    assert unet_parameters == sum(
        t.numel() for k, t in embedded_tensors().items() if k.startswith("model.diffusion_model.")
    )


def embedded_tensors() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(embedded.EMBEDDED_FILE)


def test_loading_and_generating_import_no_compiler() -> None:
    """Networks are built on meta with no initialisation: the defaults' Python decompositions would
    import torch._dynamo (about 1.5 s of every command's start) for tensors the file fills anyway."""
    import subprocess
    import sys

    code = (
        "import sys, openldm; openldm.load().txt2img('a red circle', steps=1, progress=False); "
        "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_missing_weights_say_what_to_do(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(packaged, "EMBEDDED_FILE", tmp_path / "embedded.safetensors")
    with pytest.raises(MissingWeightsError, match="missing from this installation.*Reinstall openldm"):
        openldm.load()
    code, _, err = run(capsys, "txt2img", "--outdir", tmp_path)
    assert code == 2 and err.count("\n") == 1 and "Reinstall openldm" in err
    assert not (tmp_path / "samples").exists()
    with pytest.raises(TypeError, match="no preset"):
        embedded.load_embedded_networks(preset="sd15")


# --- the CLI -----------------------------------------------------------------------------------


@needs_weights
def test_txt2img_without_ckpt_writes_the_golden_image(tmp_path, capsys) -> None:
    # No --ckpt and no --prompt: the embedded model draws its default prompt, at its image size.
    out = tmp_path / "out"
    argv = ["--ddim_steps", "20", "--n_samples", "1", "--n_iter", "1", "--seed", "0", "--outdir", out]
    code, _, err = run(capsys, "txt2img", *argv)
    assert code == 0, err
    image = Image.open(out / "samples" / "00000.png")
    size = preset("embedded").image_size
    assert image.size == (size, size) and (out / "grid-0000.png").is_file()
    params = read_parameters(out / "samples" / "00000.png")
    assert params["Prompt"] == embedded.EMBEDDED_PROMPT == PROMPT
    assert params["Model"] == "embedded" and params["CFG scale"] == SETTINGS["guidance_scale"]
    mean, largest = golden_difference(image)
    assert mean <= GOLDEN_MEAN_TOLERANCE and largest <= GOLDEN_MAX_TOLERANCE, (mean, largest)


@needs_weights
def test_txt2img_prompt_flag(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    prompt = "a green square on a white background"
    code, _, err = run(
        capsys,
        "txt2img",
        "--prompt",
        prompt,
        "--ddim_steps",
        "2",
        "--n_samples",
        "2",
        "--n_iter",
        "1",
        "--skip_grid",
        "--outdir",
        out,
    )
    assert code == 0, err
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == ["00000.png", "00001.png"]
    assert read_parameters(out / "samples" / "00001.png")["Prompt"] == prompt
    size = preset("embedded").image_size
    assert Image.open(out / "samples" / "00001.png").size == (size, size)


def test_default_prompt_depends_on_the_model() -> None:
    def prompt(ckpt: str | None, given: str | None) -> str:
        return default_prompt(argparse.Namespace(ckpt=ckpt, prompt=given))

    assert prompt(None, None) == embedded.EMBEDDED_PROMPT
    assert prompt("v1-5.safetensors", None) == DEFAULT_PROMPT
    assert prompt(None, "a blue dot") == "a blue dot"


@pytest.mark.parametrize(
    "argv",
    [["variations", "--init-img", "photo.png"], ["upscale", "--init-img", "photo.png"]],
)
def test_family_commands_need_a_checkpoint(argv, tmp_path, capsys) -> None:
    code, _, err = run(capsys, *argv, "--outdir", tmp_path)
    assert code == 2 and err.count("\n") == 1 and err.startswith("openldm: error: ")
    assert re.search(r"needs (--ckpt|the x4 upscaler)", err), err


@pytest.mark.parametrize(
    ("argv", "kind"),
    [(["inpaint", "--mask", "{image}"], "inpaint"), (["depth2img", "--depth-map", "{image}"], "depth")],
)
def test_inpaint_and_depth2img_default_to_the_embedded_variants(
    argv, kind, monkeypatch, tmp_path, capsys
) -> None:
    image = tmp_path / "image.png"
    Image.new("RGB", (64, 64), "white").save(image)
    monkeypatch.setattr(packaged, "EMBEDDED_FILE", tmp_path / "data" / "embedded.safetensors")
    args = [a.replace("{image}", str(image)) for a in argv]
    code, _, err = run(capsys, *args, "--init-img", image, "--outdir", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1, err
    assert f"the embedded {kind} variant is missing" in err and f"--stage {kind}" in err
    assert not (tmp_path / "out" / "samples").exists()
    with pytest.raises(ValueError, match="unknown embedded variant"):
        embedded.variant_file("upscale")


@needs_weights
@pytest.mark.parametrize("argv", [["inpaint", "--mask", "{mask}"], ["depth2img", "--depth-map", "{mask}"]])
def test_inpaint_and_depth2img_without_a_prompt(argv, tmp_path, capsys) -> None:
    """No --prompt: the embedded model's default prompt, as txt2img's (written into the PNG)."""
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 64), "white").save(image)
    white_box = Image.new("L", (64, 64), 0)
    white_box.paste(255, (16, 16, 48, 48))
    white_box.save(mask)
    args = [a.replace("{mask}", str(mask)) for a in argv]
    out = tmp_path / "out"
    code, _, err = run(capsys, *args, "--init-img", image, "--steps", "2", "--skip_grid", "--outdir", out)
    assert code == 0, err
    assert read_parameters(out / "samples" / "00000.png")["Prompt"] == embedded.EMBEDDED_PROMPT


def test_help_names_the_default_model(capsys) -> None:
    assert main(["txt2img", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "default: the embedded model" in text and embedded.EMBEDDED_PROMPT in text
    assert main(["eval", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "kind >= 85" in text and "--ground-truth" in text and "examples:" in text


# --- golden image and fidelity -----------------------------------------------------------------


@needs_weights
def test_golden_image(model) -> None:
    image = model.txt2img(PROMPT, progress=False, **SETTINGS).images[0]
    mean, largest = golden_difference(image)
    assert mean <= GOLDEN_MEAN_TOLERANCE and largest <= GOLDEN_MAX_TOLERANCE, (mean, largest)


@needs_weights
def test_images_do_not_depend_on_the_batching(model) -> None:
    generate = model_generator(model, seed=3, precision=None)
    setting = Setting("ddim", 3, 7.5)
    captions = [
        "a red circle in the centre on a blue background",
        "a yellow square at the top on a black background",
    ]
    together = generate(captions, [], 0, setting)
    alone = generate(captions[1:], [], 1, setting)
    assert np.abs(pixels(together[1]) - pixels(alone[0])).max() <= 1
    assert np.abs(pixels(together[0]) - pixels(together[1])).mean() > 10  # different seeds and captions


@pytest.fixture(scope="module")
def fidelity(model) -> dict[str, dict[str, float]]:
    """Scores on FIDELITY_N images per set (DDIM, 25 steps, guidance 7.5; about 20 s of one core)."""
    setting = Setting("ddim", 25, 7.5)
    return score_settings(model_generator(model, 0, None), [setting], FIDELITY_N, 0, FIDELITY_N, False)[
        setting
    ]


def shortfalls(scores: dict[str, dict[str, float]], floors: dict[str, dict[str, float]]) -> list[str]:
    return [
        f"{name} {attribute} {100 * scores[name][attribute]:.1f} < {floor}"
        for name, attributes in floors.items()
        for attribute, floor in attributes.items()
        if 100 * scores[name][attribute] < floor
    ]


@needs_weights
def test_prompt_fidelity_meets_the_targets(fidelity) -> None:
    """The issue's targets, minus 10 points (the small sets are noisy)."""
    low = shortfalls(fidelity, FIDELITY_FLOORS)
    assert not low, "; ".join(low)


@needs_weights
def test_prompt_fidelity_of_the_packaged_model(fidelity) -> None:
    low = shortfalls(fidelity, SHIPPED_FLOORS)
    assert not low, "; ".join(low)


# --- openldm eval ------------------------------------------------------------------------------


def test_eval_ground_truth_scores_100(tmp_path, capsys) -> None:
    path = tmp_path / "gt.json"
    code, out, err = run(capsys, "eval", "--ground-truth", "--n", "20", "--json", path, "--no-progress")
    assert code == 0, err
    result = json.loads(path.read_text())
    assert result["ground_truth"] is True and result["n"] == 20 and result["missed_targets"] == []
    for name in ("seen", "held-out"):
        scores = result["main"][name]
        assert scores["images"] == 20
        assert [scores[a] for a in ("colour", "kind", "position", "count", "scene")] == [1.0] * 5
    assert "| seen | 20 | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 |" in out
    assert "All targets met." in out
    # The hard cases: the renderer's images hold exactly what each prompt asks.
    cases = result["cases"]
    assert list(cases) == ["one shape, no position", "three of a kind", "held-out pair in two"]
    assert all(c["objects"] == c["exact"] == 1.0 and c["images"] == 20 for c in cases.values())
    assert cases["held-out pair in two"]["held-out"] == 1.0
    assert "| three of a kind | 20 | 100.0 | 100.0 | - |" in out


def table(out: str, heading: str) -> list[list[str]]:
    """The cells of the Markdown table under ``heading`` (header row first, separator dropped)."""
    block = out.split(heading, 1)[1].strip().split("\n\n")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()]
    return [rows[0], *rows[2:]]


@needs_weights
def test_eval_guidance_sweep(tmp_path, capsys) -> None:
    path = tmp_path / "sweep.json"
    argv = [
        "eval",
        "--n",
        "4",
        "--steps",
        "2",
        "--sweep",
        "guidance",
        "--guidance-list",
        "1,2",
        "--json",
        path,
    ]
    code, out, err = run(capsys, *argv, "--batch-size", "3")
    assert code == 0, err
    assert "sampler: ddim | steps: 2 | guidance: 7.5 | n: 4 per set | seed: 0" in out
    assert "eval" in err and "batch" in err  # the progress bar: 2 sets x 2 batches x 3 settings
    main_rows = table(out, "seed: 0\n")
    assert main_rows[0] == ["set", "images", "colour", "kind", "position", "count", "scene"]
    assert [r[:2] for r in main_rows[1:]] == [["seen", "4"], ["held-out", "4"]]
    sweep = table(out, "## Guidance sweep (ddim, 2 steps)")
    assert sweep[0] == [
        "guidance",
        "seen colour",
        "seen kind",
        "seen position",
        "seen count",
        "held-out colour",
        "held-out kind",
    ]
    assert [r[0] for r in sweep[1:]] == ["1", "2"]
    result = json.loads(path.read_text())
    assert [e["guidance"] for e in result["guidance_sweep"]] == [1.0, 2.0] and result["steps_sweep"] == []
    for row, entry in zip(sweep[1:], result["guidance_sweep"], strict=True):
        assert entry["steps"] == 2 and entry["sampler"] == "ddim"
        expected = [
            entry[s][a]
            for s, a in [
                ("seen", "colour"),
                ("seen", "kind"),
                ("seen", "position"),
                ("seen", "count"),
                ("held-out", "colour"),
                ("held-out", "kind"),
            ]
        ]
        assert [float(c) for c in row[1:]] == pytest.approx([round(100 * v, 1) for v in expected], abs=0.051)
    assert "## Steps sweep" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n", "0"], "--n must be >= 1, got 0"),
        (["--sampler", "magic"], "unknown sampler 'magic'"),
        (["--sweep", "steps", "--samplers", "ddim,magic"], "unknown sampler 'magic'"),
        (
            ["--sweep", "guidance", "--guidance-list", "1,x"],
            "--guidance-list must be comma-separated numbers",
        ),
        (["--sweep", "steps", "--step-list", "0,5"], "--step-list must be >= 1"),
        (["--ground-truth", "--sweep", "all"], "sweeps need a model"),
        (["--config", "v1.yaml"], "pass --ckpt too"),
    ],
)
def test_eval_bad_input(argv, message, capsys) -> None:
    code, out, err = run(capsys, "eval", *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


# --- the packaged inpainting and depth variants (issue 5) ----------------------------------------

VARIANT_N = 24
# What the packaged variants score on these 24 scenes (measured when their weights landed), minus 5
# to 10 points (the sets are small): a regression guard. Percent; kept_error in levels 0..255 (a ceiling).
VARIANT_FLOORS = {
    "inpaint": {"repainted": 85, "position": 90, "kept_shapes": 90, "kept_error": 7},  # 95.8, 100, 100, 4.6
    "depth": {"colour": 90, "position": 90, "count": 85, "order_found": 80},  # 100, 100, 94.6, 90.5
}


def variant_scores(kind: str) -> dict[str, float]:
    """``kind``'s packaged variant on VARIANT_N evaluation scenes (DDIM, 25 steps, guidance 7.5)."""
    from openldm.commands.eval_variants import depth_fidelity, inpaint_fidelity

    model = openldm.load(embedded.variant_file(kind), dtype=torch.float32)
    fidelity = inpaint_fidelity if kind == "inpaint" else depth_fidelity
    return fidelity(model, VARIANT_N, 0, {"steps": 25, "guidance_scale": 7.5, "progress": False})


@needs_weights
@pytest.mark.parametrize("kind", ["inpaint", "depth"])
def test_fidelity_of_the_packaged_variants(kind) -> None:
    scores = variant_scores(kind)
    low = [
        f"{name} {100 * scores[name]:.1f} < {floor}"
        for name, floor in VARIANT_FLOORS[kind].items()
        if name != "kept_error" and 100 * scores[name] < floor
    ]
    if scores.get("kept_error", 0.0) > VARIANT_FLOORS[kind].get("kept_error", 255):
        low.append(f"kept_error {scores['kept_error']:.1f} > {VARIANT_FLOORS[kind]['kept_error']}")
    assert not low, "; ".join(low)
