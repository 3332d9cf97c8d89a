"""Images: tensor <-> PIL conversion, grids as the reference tiles them, the web UI's parameters text."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from openldm.images import (
    fit_to_multiple,
    format_parameters,
    image_grid,
    load_image,
    parse_parameters,
    pil_to_tensor,
    read_parameters,
    save_png,
    tensor_to_pil,
)


def _solid(value: int, size: tuple[int, int] = (8, 6)) -> Image.Image:
    return Image.new("RGB", size, (value, value, value))


def test_pil_tensor_round_trip_is_exact() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    tensor = pil_to_tensor(Image.fromarray(pixels))
    assert tensor.shape == (1, 3, 6, 10) and tensor.dtype == torch.float32
    assert float(tensor.min()) >= -1 and float(tensor.max()) <= 1
    # Truncating (as the reference does) may lose one level where float error lands just below k.
    back = np.asarray(tensor_to_pil(tensor)[0])
    assert np.abs(back.astype(int) - pixels.astype(int)).max() <= 1


def test_quantisation_truncates_like_the_reference() -> None:
    # 0.999 -> 254.7 -> 254 (the reference's astype(uint8)), not 255; values outside [-1, 1] are clamped.
    x = torch.tensor([0.999 * 2 - 1, 3.0, -3.0]).reshape(1, 3, 1, 1)
    assert tuple(np.asarray(tensor_to_pil(x)[0])[0, 0]) == (254, 255, 0)


def test_grid_tiles_n_rows_images_per_row_with_two_pixel_black_borders() -> None:
    images = [_solid(v) for v in (10, 20, 30, 40, 50)]
    grid = np.asarray(image_grid(images, n_rows=2))
    # 2 columns, 3 rows of 8x6 images, 2 pixels of padding around and between.
    assert grid.shape == (3 * (6 + 2) + 2, 2 * (8 + 2) + 2, 3)
    for i, value in enumerate((10, 20, 30, 40, 50)):
        row, col = divmod(i, 2)
        y, x = 2 + row * 8, 2 + col * 10
        assert (grid[y : y + 6, x : x + 8] == value).all()
    assert (grid[:2] == 0).all() and (grid[:, :2] == 0).all()
    assert (grid[2 + 2 * 8 :, 12:] == 0).all()  # the empty sixth cell
    assert image_grid(images, n_rows=9).size == (5 * 10 + 2, 6 + 4)


def test_grid_rejects_mixed_sizes_and_bad_rows() -> None:
    with pytest.raises(ValueError, match="must all be"):
        image_grid([_solid(1), _solid(1, (4, 4))], 2)
    with pytest.raises(ValueError, match="n_rows"):
        image_grid([_solid(1)], 0)


def test_parameters_text_has_the_web_ui_layout() -> None:
    settings = {
        "Steps": 20,
        "Sampler": "Euler a",
        "CFG scale": 7.5,
        "Seed": 42,
        "Size": "512x512",
        "Model": "m",
    }
    text = format_parameters("a cat", "blurry", settings)
    assert text == (
        "a cat\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: m"
    )
    assert format_parameters("a cat", "", {"Steps": 20, "Seed": None}) == "a cat\nSteps: 20"


def test_parameters_round_trip_with_quoting_and_several_lines() -> None:
    settings = {"Steps": 5, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 9.0, "Seed": 7}
    settings |= {"Model": "sd, v2: final", "Denoising strength": 0.75}
    text = format_parameters("line one\nline two, (red:1.2)", "ugly\nblurry", settings)
    assert 'Model: "sd, v2: final"' in text
    parsed = parse_parameters(text)
    assert parsed == {
        "Prompt": "line one\nline two, (red:1.2)",
        "Negative prompt": "ugly\nblurry",
        **settings,
    }
    assert isinstance(parsed["Steps"], int) and isinstance(parsed["CFG scale"], float)


def test_png_carries_parameters(tmp_path) -> None:
    image = _solid(100)
    image.info["parameters"] = format_parameters("p", "n", {"Steps": 1, "Sampler": "DDIM", "Seed": 3})
    path = save_png(image, tmp_path / "sub" / "x.png")
    assert read_parameters(path) == {
        "Prompt": "p",
        "Negative prompt": "n",
        "Steps": 1,
        "Sampler": "DDIM",
        "Seed": 3,
    }
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))
    assert read_parameters(save_png(_solid(1), tmp_path / "plain.png")) == {}


def test_load_image_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read"):
        load_image(tmp_path / "text.png")
    _solid(5, (13, 20)).save(tmp_path / "odd.png")
    assert fit_to_multiple(load_image(tmp_path / "odd.png"), 8).size == (8, 16)
