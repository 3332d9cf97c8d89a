"""``openldm finetune --method lora`` on the embedded model: data checked first, a LoRA file that
openldm loads, a loss log, the same file from the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from openldm.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def _data(root: Path) -> Path:
    root.mkdir()
    for name, rgb in COLOURS.items():
        image = Image.new("RGB", (64, 64), (20, 20, 20))
        image.paste(rgb, (16, 16, 48, 48))
        image.save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"a {name} square in the centre")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "broken.txt").write_text("x")
    Image.new("RGB", (64, 64)).save(root / "lonely.png")
    return root


def _finetune(capsys, data: Path, out: Path, *extra: str) -> tuple[int, str]:
    argv = ["finetune", "--data", str(data), "--out", str(out), "--steps", "12", "--rank", "4"]
    code = main([*argv, "--resolution", "64", "--lr", "2e-3", "--text-encoder", *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_finetune_lora_on_the_embedded_model(tmp_path, capsys) -> None:
    import openldm

    data = _data(tmp_path / "data")
    code, output = _finetune(capsys, data, tmp_path / "out")
    assert code == 0, output
    assert "4 images with captions; 1 unreadable, 1 without a caption left out" in output
    log = [json.loads(line) for line in (tmp_path / "out" / "loss.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == list(range(12)) and all(np.isfinite(e["loss"]) for e in log)
    path = tmp_path / "out" / "lora.safetensors"
    sd = safetensors.torch.load_file(str(path))
    assert any(k.startswith("lora_te_") for k in sd) and any(k.startswith("lora_unet_") for k in sd)
    assert any(float(v.abs().max()) > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))
    model = openldm.load()
    plain = model.txt2img(
        "a red square in the centre", steps=4, seed=1, output_type="np", progress=False
    ).images
    model.load_lora(path)
    adapted = model.txt2img(
        "a red square in the centre", steps=4, seed=1, output_type="np", progress=False
    ).images
    assert float(np.abs(adapted - plain).max()) > 1e-3
    # The same seed, the same file.
    code, _ = _finetune(capsys, data, tmp_path / "again")
    assert code == 0
    again = safetensors.torch.load_file(str(tmp_path / "again" / "lora.safetensors"))
    assert all(torch.equal(sd[k], again[k]) for k in sd)


def test_finetune_stops_on_bad_data_when_asked(tmp_path, capsys) -> None:
    data = _data(tmp_path / "data")
    code, output = _finetune(capsys, data, tmp_path / "out", "--on-problem", "stop")
    assert code == 2 and "2 images cannot be used" in output and "lonely.png (no caption)" in output
    assert not (tmp_path / "out" / "lora.safetensors").exists()
    code, output = _finetune(capsys, tmp_path / "nothing", tmp_path / "out2")
    assert code == 2 and "no such folder" in output
