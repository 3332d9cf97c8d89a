"""``openldm txt2img`` / ``openldm img2img`` end to end on a tiny single-file checkpoint: the files the
reference scripts write, with the web UI's parameters in each PNG; bad input is one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import openldm
from openldm.cli import main
from openldm.images import read_parameters

pytest.importorskip("diffusers")  # the tiny checkpoint's weights come from the oracles

FAST = ["--H", "32", "--W", "32", "--ddim_steps", "2", "--n_samples", "2", "--n_iter", "1"]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def init_img(tmp_path_factory) -> Path:
    y, x = np.mgrid[0:40, 0:70] / 70  # not a multiple of 8: resized down to 64x40
    rgb = np.stack([x, y, (x + y) / 2], axis=-1).clip(0, 1)
    path = tmp_path_factory.mktemp("init") / "init.png"
    Image.fromarray((rgb * 255).astype(np.uint8)).save(path)
    return path


def run(capsys, *argv: str | Path) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def samples(outdir: Path) -> list[str]:
    return sorted(p.name for p in (outdir / "samples").iterdir())


def test_txt2img_writes_samples_and_grid_with_parameters(ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["txt2img", "--ckpt", ckpt, "--outdir", out, *FAST, "--n_iter", "2", "--seed", "7"]
    code, _ = run(capsys, *argv, "--prompt", "a red fox", "--negative-prompt", "blurry, dark")
    assert code == 0
    assert samples(out) == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert sorted(p.name for p in out.iterdir()) == ["grid-0000.png", "samples"]
    params = read_parameters(out / "samples" / "00003.png")
    assert params == {
        "Prompt": "a red fox",
        "Negative prompt": "blurry, dark",
        "Steps": 2,
        "Sampler": "DDIM",
        "CFG scale": 7.5,
        "Seed": 7,
        "Size": "32x32",
        "Model": "tiny-sd1",
        "Batch size": 2,
        "Batch pos": 1,
        "Iteration": 1,
    }
    grid = Image.open(out / "grid-0000.png")
    assert grid.size == (2 * 34 + 2, 2 * 34 + 2)  # n_samples images per row, n_iter rows
    assert read_parameters(out / "grid-0000.png")["Prompt"] == "a red fox"
    # The images are the Python API's for the same settings.
    model = openldm.load(ckpt)
    api = model.txt2img("a red fox", "blurry, dark", steps=2, width=32, height=32, n_samples=2, n_iter=2,
                        seed=7, progress=False)  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(out / "samples" / "00003.png")), np.asarray(api.images[3]))

    # A second run numbers on from the files already there.
    assert run(capsys, "txt2img", "--ckpt", ckpt, "--outdir", out, *FAST, "--sampler", "euler")[0] == 0
    assert samples(out)[-2:] == ["00004.png", "00005.png"]
    assert (out / "grid-0001.png").is_file()
    assert read_parameters(out / "samples" / "00005.png")["Sampler"] == "Euler"


def test_skip_grid_and_skip_save(ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert run(capsys, "txt2img", "--ckpt", ckpt, "--outdir", out, *FAST, "--skip_grid")[0] == 0
    assert samples(out) == ["00000.png", "00001.png"] and not list(out.glob("grid-*"))
    assert (
        run(capsys, "txt2img", "--ckpt", ckpt, "--outdir", out, *FAST, "--skip_save", "--n_rows", "1")[0] == 0
    )
    assert samples(out) == ["00000.png", "00001.png"]
    assert Image.open(out / "grid-0000.png").size == (34 + 2, 2 * 34 + 2)  # one image per row


def test_from_file_and_fixed_code(ckpt, tmp_path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\na bird\n", encoding="utf-8")
    out = tmp_path / "file"
    assert run(capsys, "txt2img", "--ckpt", ckpt, "--outdir", out, *FAST, "--from-file", prompts)[0] == 0
    written = [read_parameters(out / "samples" / name)["Prompt"] for name in samples(out)]
    assert written == ["a cat", "a dog", "a bird"]  # batches of n_samples prompts, blank lines skipped

    def pixels(folder: Path) -> list[np.ndarray]:
        return [np.asarray(Image.open(folder / "samples" / name)) for name in samples(folder)]

    repeats = ["--n_samples", "1", "--n_iter", "2", "--skip_grid"]
    fixed, free = tmp_path / "fixed", tmp_path / "free"
    assert run(capsys, "txt2img", "--ckpt", ckpt, "--outdir", fixed, *FAST, *repeats, "--fixed_code")[0] == 0
    assert run(capsys, "txt2img", "--ckpt", ckpt, "--outdir", free, *FAST, *repeats)[0] == 0
    first, second = pixels(fixed)
    assert np.array_equal(first, second)
    assert np.array_equal(pixels(free)[0], first) and not np.array_equal(pixels(free)[1], first)


def test_img2img_writes_files_with_strength(ckpt, init_img, tmp_path, capsys) -> None:
    out = tmp_path / "img"
    argv = ["img2img", "--ckpt", ckpt, "--init-img", init_img, "--outdir", out, "--ddim_steps", "4"]
    assert run(capsys, *argv, "--strength", "0.5", "--prompt", "an oil painting")[0] == 0
    assert samples(out) == ["00000.png", "00001.png"] and (out / "grid-0000.png").is_file()
    params = read_parameters(out / "samples" / "00001.png")
    assert params["Denoising strength"] == 0.5 and params["Size"] == "64x40" and params["CFG scale"] == 5.0
    assert Image.open(out / "samples" / "00000.png").size == (64, 40)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["txt2img", "--H", "60"], "--H must be a positive multiple of 8, got 60"),
        (["txt2img", "--W", "0"], "--W must be a positive multiple of 8"),
        (["txt2img", "--ddim_steps", "0"], "--ddim_steps must be a whole number >= 1, got 0"),
        (["txt2img", "--sampler", "magic"], "unknown sampler 'magic'; choose one of: ddim"),
        (["txt2img", "--n_samples", "0"], "--n_samples must be a whole number >= 1"),
        (["txt2img", "--C", "8"], "--C 8 does not match the model's 4 latent channels"),
        (["txt2img", "--from-file", "no-such-file.txt"], "does not exist"),
        (["img2img", "--init-img", "INIT", "--strength", "1.5"], "--strength must be between 0 and 1"),
        (["img2img", "--init-img", "INIT", "--strength", "-0.5"], "--strength must be between 0 and 1"),
        (["img2img", "--init-img", "no-such-image.png"], "--init-img 'no-such-image.png' does not exist"),
        (["img2img", "--init-img", "NOT_AN_IMAGE"], "cannot read --init-img"),
        (["img2img"], "the following arguments are required: --init-img"),
        (["txt2img", "--ddim_steps", "many"], "invalid int value: 'many'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(ckpt, init_img, tmp_path, capsys, argv, message) -> None:
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    argv = [{"INIT": str(init_img), "NOT_AN_IMAGE": str(not_an_image)}.get(a, a) for a in argv]
    code, err = run(capsys, *argv, "--ckpt", ckpt, "--outdir", tmp_path / "out")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("openldm: error: ") and message in lines[0], err
    assert not (tmp_path / "out" / "samples").exists()


def test_missing_checkpoint_says_what_to_do(tmp_path, capsys) -> None:
    # Without --ckpt txt2img runs the embedded model (tests/test_embedded.py); a --config needs a --ckpt.
    code, err = run(capsys, "txt2img", "--config", tmp_path / "v1-inference.yaml", "--outdir", tmp_path)
    assert code == 2 and err.count("\n") == 1
    assert "--config describes the checkpoint of --ckpt" in err
    code, err = run(capsys, "txt2img", "--ckpt", tmp_path / "nope.safetensors", "--outdir", tmp_path)
    assert code == 2 and err.count("\n") == 1 and err.startswith("openldm: error: ")


def test_help_teaches(capsys) -> None:
    assert main(["txt2img", "--help"]) == 0
    text = capsys.readouterr().out
    assert (
        "examples:" in text and "--ddim_steps" in text and "--negative-prompt" in text and "euler_a" in text
    )
    assert main(["img2img", "--help"]) == 0
    assert "--strength" in capsys.readouterr().out


def test_subprocess_bad_input(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "openldm", "txt2img", "--H", "65", "--ckpt", "x.safetensors"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == "openldm: error: --H must be a positive multiple of 8, got 65\n"
    assert result.stdout == ""
