"""Bad input answered before any work, with one line and exit status 2 (an exception in the Python API),
and outputs written whole or not at all: the cases of "green on every machine, every bad input caught".

Each command-line case also passes a --ckpt that does not exist: the answer must be about the bad input,
which proves it was checked before the checkpoint was read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import openldm
from openldm.cli import main
from openldm.commands import outputs
from openldm.devices import DeviceError, resolve_device
from openldm.files import PACKAGE_DIR, replaced_when_done
from openldm.images import read_parameters
from openldm.pipelines import memory
from openldm.pipelines.memory import InsufficientMemoryError, Request, estimate
from openldm.sampling.samplers import SAMPLERS
from tests.helpers import PRINT_PEAK_KIB

FAST = ["--H", "32", "--W", "32", "--ddim_steps", "2", "--n_samples", "2", "--n_iter", "1"]
MISSING = "no-such-model.safetensors"


def run(capsys, *argv: str | Path) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line(err: str, message: str) -> bool:
    lines = err.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("openldm: error: ") and message in lines[0]


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# --- output folders ------------------------------------------------------------------------------


def test_outdir_that_is_a_file(tmp_path, capsys) -> None:
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    code, err = run(capsys, "txt2img", "--ckpt", MISSING, "--outdir", target)
    assert code == 2 and one_line(err, f"--outdir '{target}' is a file, not a folder"), err
    code, err = run(capsys, "txt2img", "--ckpt", MISSING, "--outdir", target / "below")
    assert code == 2 and one_line(err, f"is inside '{target}', which is a file"), err
    assert target.read_text() == "not a folder"


def test_read_only_outdir(tmp_path, capsys, read_only_folder) -> None:
    out = read_only_folder(tmp_path / "locked")
    code, err = run(capsys, "txt2img", "--ckpt", MISSING, "--outdir", out)
    assert code == 2 and one_line(err, f"--outdir '{out}' is not writable"), err
    code, err = run(capsys, "txt2img", "--ckpt", MISSING, "--outdir", out / "new")
    assert code == 2 and one_line(err, f"cannot be created in '{out}'"), err
    assert files(out) == []


def test_read_only_samples_folder_writes_no_grid_either(tmp_path, capsys, read_only_folder) -> None:
    out = tmp_path / "out"
    read_only_folder(out / "samples")
    code, err = run(capsys, "txt2img", "--ckpt", MISSING, "--outdir", out)
    assert code == 2 and one_line(err, f"--outdir's samples folder '{out / 'samples'}' is not writable"), err
    assert files(out) == ["samples"]
    # --skip_save writes no samples: the grid alone goes in the writable folder.
    code, err = run(capsys, "txt2img", "--outdir", out, "--skip_save", "--ddim_steps", "2", "--n_iter", "1")
    assert code == 0, err
    assert files(out) == ["grid-0000.png", "samples"]


def test_eval_and_train_check_their_folders_first(tmp_path, capsys) -> None:
    target = tmp_path / "a-file"
    target.write_text("")
    code, err = run(capsys, "eval", "--ckpt", MISSING, "--json", target / "eval.json")
    assert code == 2 and one_line(err, "--json's folder"), err
    code, err = run(capsys, "train", "--out", target, "--steps", "1")
    assert code == 2 and one_line(err, f"--out '{target}' is a file"), err


# --- nothing half-written ------------------------------------------------------------------------


def _images(count: int) -> list[Image.Image]:
    images = []
    for i in range(count):
        image = Image.new("RGB", (8, 8), (10 * i, 0, 0))
        image.info["parameters"] = f"image {i}"
        images.append(image)
    return images


def test_write_outputs_numbers_on_and_writes_all_or_nothing(tmp_path, monkeypatch) -> None:
    written = outputs.write_outputs(tmp_path, _images(2), grid_rows=2)
    assert files(tmp_path) == ["grid-0000.png", "samples", "samples/00000.png", "samples/00001.png"]
    assert written[-1] == tmp_path / "grid-0000.png"
    assert read_parameters(tmp_path / "samples" / "00001.png")["Prompt"] == "image 1"
    umask = os.umask(0)
    os.umask(umask)
    assert all(path.stat().st_mode & 0o777 == 0o666 & ~umask for path in written)  # as any new file
    before = files(tmp_path)

    # A failure while encoding the grid, after the samples were encoded: no new file at all.
    real = outputs.png_bytes
    monkeypatch.setattr(outputs, "png_bytes", lambda image, text=None: real(image) if text is None else 1 / 0)
    with pytest.raises(ZeroDivisionError):
        outputs.write_outputs(tmp_path, _images(3), grid_rows=3)
    assert files(tmp_path) == before  # no PNG, no temporary file
    monkeypatch.setattr(outputs, "png_bytes", real)

    # A failure while naming the files (the third of four): the two already named are taken back.
    commit, calls = outputs._commit, []

    def failing(item, numbers):
        calls.append(item)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return commit(item, numbers)

    monkeypatch.setattr(outputs, "_commit", failing)
    with pytest.raises(OSError, match="No space left"):
        outputs.write_outputs(tmp_path, _images(3), grid_rows=3)
    assert files(tmp_path) == before
    monkeypatch.setattr(outputs, "_commit", commit)

    # A name taken meanwhile by another process is never overwritten: the next number is used.
    (tmp_path / "samples" / "00002.png").write_bytes(b"someone else's")
    written = outputs.write_outputs(tmp_path, _images(1))
    assert written == [tmp_path / "samples" / "00003.png"]
    assert (tmp_path / "samples" / "00002.png").read_bytes() == b"someone else's"


def test_a_failed_replacement_keeps_the_old_file(tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), replaced_when_done(path) as temporary:
        temporary.write_bytes(b"half of the ne")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and files(tmp_path) == ["model.safetensors"]
    with replaced_when_done(path) as temporary:
        temporary.write_bytes(b"new")
    assert path.read_bytes() == b"new" and files(tmp_path) == ["model.safetensors"]


# --- memory --------------------------------------------------------------------------------------


def _child_peak(argv: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``openldm argv`` in a child Python; its result and its peak memory in GiB."""
    code = (
        "import sys\nfrom openldm.cli import main\nstatus = main(sys.argv[1:])\n"
        + PRINT_PEAK_KIB
        + "sys.exit(status)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=cwd, timeout=300
    )
    return result, int(result.stdout.split()[-1]) / 2**20


@pytest.mark.parametrize(
    "size",
    [["--H", "80000", "--W", "80000"], ["--n_samples", "100000000"]],
    ids=["80000x80000", "100000000-samples"],
)
def test_a_request_that_cannot_fit_is_refused_before_allocating(tmp_path, size) -> None:
    result, peak = _child_peak(["txt2img", "--outdir", "out", *size], tmp_path)
    assert result.returncode == 2, result.stderr
    assert one_line(result.stderr, "this request needs about"), result.stderr
    assert "available; ask for fewer images at a time" in result.stderr
    assert peak < 1.5, peak  # the embedded model and torch: nothing of the request was allocated
    assert files(tmp_path) == []


def test_the_memory_check_compares_the_estimate_with_what_is_free(monkeypatch) -> None:
    model = openldm.load()
    monkeypatch.setattr(memory, "available_memory", lambda device: 2**30)
    model.txt2img("a red circle", steps=1, n_samples=2, progress=False, output_type="latent")
    needed = estimate(model.spec, Request(8, 1, (64, 64), (512, 512)), torch.device("cpu")).peak
    assert needed > 2**30
    with pytest.raises(InsufficientMemoryError, match=r"needs about .* but cpu has 1.0 GiB available"):
        model.txt2img(
            "a red circle", steps=1, width=512, height=512, n_samples=8, progress=False, vae_tiling="off"
        )
    with pytest.raises(InsufficientMemoryError):  # every pipeline checks, here img2img's encoder too
        init = Image.new("RGB", (512, 512))
        model.img2img("a red circle", init, steps=1, n_samples=8, progress=False, vae_tiling="off")
    # With the VAE coding by bands ("auto", the default, picks them here) the same request fits.
    banded = estimate(model.spec, Request(8, 1, (64, 64), (512, 512)), torch.device("cpu"), banded=True).peak
    assert banded < 2**30 < needed, banded


MEASURE = """
import json, sys
from pathlib import Path
import torch
import openldm
from openldm.pipelines.memory import Request, estimate

def status(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
    return int(line.split()[1]) * 1024

torch.set_num_threads(1)
model = openldm.load()
size, batch, output = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
model.txt2img("a red circle", steps=1, progress=False)  # warm up: what every run needs
Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
base = status("VmRSS:")
model.txt2img(
    "a red circle", steps=1, width=size, height=size, n_samples=batch, output_type=output, progress=False
)
request = Request(batch, 1, (size // 8, size // 8), (size, size), decode=output != "latent")
print(json.dumps([status("VmHWM:") - base, estimate(model.spec, request, torch.device("cpu")).peak]))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resetting the peak needs Linux")
@pytest.mark.parametrize(("size", "batch", "output"), [(384, 1, "pil"), (512, 2, "latent")])
def test_the_estimate_is_close_to_the_measured_peak(tmp_path, size, batch, output) -> None:
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(size), str(batch), output],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    measured, estimated = json.loads(result.stdout.splitlines()[-1])
    # Measured on this project's 2-core machines: 0.80 to 1.0 of the estimate (decoding), 0.6 to 0.8
    # (the UNet alone); the estimate is meant to be close and on the high side.
    assert 0.5 * estimated < measured < 1.25 * estimated, (measured, estimated)


# --- devices, threads, version -------------------------------------------------------------------


def _missing_devices() -> list[str]:
    names = ["banana", "cuda:99"]
    if not torch.cuda.is_available():
        names.append("cuda")
    if not torch.backends.mps.is_available():
        names.append("mps")
    return names


@pytest.mark.parametrize("device", _missing_devices())
def test_a_device_this_machine_lacks(tmp_path, capsys, device) -> None:
    code, err = run(capsys, "txt2img", "--ckpt", MISSING, "--device", device, "--outdir", tmp_path)
    assert code == 2 and one_line(err, "device"), err
    assert "use one of cpu, cuda" in err or "is not available" in err or "does not exist" in err
    with pytest.raises(DeviceError):
        resolve_device(device)
    with pytest.raises(DeviceError):
        openldm.load(device=device)


def test_threads_and_version(tmp_path, capsys) -> None:
    code, err = run(capsys, "txt2img", "--threads", "0", "--outdir", tmp_path)
    assert code == 2 and one_line(err, "--threads must be >= 1, got 0")
    threads = torch.get_num_threads()
    try:
        assert (
            run(capsys, "inspect", str(PACKAGE_DIR / "data" / "embedded.safetensors"), "--threads", "1")[0]
            == 0
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    for command in ("txt2img", "img2img", "inpaint", "depth2img", "upscale", "variations", "eval", "train"):
        assert main([command, "--help"]) == 0
        assert "--threads N" in capsys.readouterr().out, command
    result = subprocess.run([sys.executable, "-m", "openldm", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith(f"openldm {openldm.__version__} (torch ")


# --- inputs in the command line's words ----------------------------------------------------------


def test_a_folder_given_as_an_image(tmp_path, capsys) -> None:
    code, err = run(capsys, "img2img", "--ckpt", MISSING, "--init-img", tmp_path, "--outdir", tmp_path)
    assert code == 2 and one_line(err, f"--init-img '{tmp_path}' is a folder; give an image file"), err


def test_an_offline_hub_id_in_the_command_lines_words(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "openldm", "txt2img", "--ckpt", "stabilityai/stable-diffusion-2-1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert result.returncode == 2
    assert one_line(result.stderr, "--ckpt 'stabilityai/stable-diffusion-2-1' is not a file or folder here")
    assert "pass its path: --ckpt path/to/folder" in result.stderr and "load()" not in result.stderr


# --- training never writes into the package unless asked -----------------------------------------


def test_training_refuses_a_run_folder_inside_the_package(capsys) -> None:
    inside = PACKAGE_DIR / "data" / "a-run"
    code, err = run(capsys, "train", "--out", inside, "--stage", "inpaint", "--steps", "1")
    assert code == 2 and one_line(err, "lies inside the installed openldm package"), err
    assert not inside.exists()


# --- the PNG alone reproduces its image ----------------------------------------------------------


def test_a_png_alone_reproduces_its_image(tiny_checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["txt2img", "--ckpt", tiny_checkpoint, "--outdir", out, *FAST, "--n_samples", "3", "--n_iter", "2"]
    assert run(capsys, *argv, "--seed", "11", "--sampler", "euler_a", "--prompt", "a fox")[0] == 0
    path = out / "samples" / "00004.png"  # the second image of the second batch
    params = read_parameters(path)
    assert (params["Seed"], params["Batch size"], params["Batch pos"], params["Iteration"]) == (11, 3, 1, 1)
    names = {info.display_name: name for name, info in SAMPLERS.items()}
    width, height = (int(side) for side in params["Size"].split("x"))
    again = openldm.load(tiny_checkpoint, dtype=torch.float32).txt2img(
        params["Prompt"],
        params["Negative prompt"],
        steps=params["Steps"],
        guidance_scale=params["CFG scale"],
        sampler=names[params["Sampler"]],
        seed=params["Seed"],
        width=width,
        height=height,
        n_samples=params["Batch size"],
        n_iter=params["Iteration"] + 1,
        progress=False,
    )
    image = again.images[params["Iteration"] * params["Batch size"] + params["Batch pos"]]
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(path)))
