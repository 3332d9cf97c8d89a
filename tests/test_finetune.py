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
from tests.helpers import write_squares

pytestmark = pytest.mark.usefixtures("single_thread")


def _data(root: Path) -> Path:
    write_squares(root)
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
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == list(range(1, 13)) and all(np.isfinite(e["loss"]) for e in log)
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


def _ti_data(root: Path, word: str) -> Path:
    root.mkdir()
    for n, rgb in enumerate([(200, 40, 160), (180, 30, 150)]):
        image = Image.new("RGB", (64, 64), (20, 20, 20))
        image.paste(rgb, (8 + 8 * n, 16, 40 + 8 * n, 48))
        image.save(root / f"{n}.png")
        (root / f"{n}.txt").write_text(f"a {word} square")
    return root


def test_textual_inversion_learns_a_word_and_leaves_the_model_as_it_was(tmp_path, capsys) -> None:
    import openldm

    data = _ti_data(tmp_path / "data", "zorp")
    argv = [
        "finetune",
        "--method",
        "textual-inversion",
        "--word",
        "zorp",
        "--init-word",
        "red",
        "--vectors",
        "2",
    ]
    argv += [
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "10",
        "--lr",
        "5e-3",
        "--resolution",
        "64",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    vectors = safetensors.torch.load_file(str(tmp_path / "out" / "zorp.safetensors"))["emb_params"]
    model = openldm.load()
    red = model.text_encoder.text_model.embeddings.token_embedding.weight[model.tokenizer.encode("red")].mean(
        0
    )
    assert vectors.shape == (2, model.spec.text.width)
    assert float((vectors - red).abs().max()) > 1e-3  # it moved from where it started
    plain = model.txt2img("a zorp square", steps=4, seed=1, output_type="np", progress=False).images
    model.load_embedding(tmp_path / "out" / "zorp.safetensors")
    learned = model.txt2img("a zorp square", steps=4, seed=1, output_type="np", progress=False).images
    assert float(np.abs(learned - plain).max()) > 1e-3
    # Wrong uses: a word no caption has, no --word.
    assert (
        main([*argv[:4], "blorb", *argv[5:]]) == 2
        and "no caption uses the word 'blorb'" in capsys.readouterr().err
    )
    assert main(["finetune", "--method", "textual-inversion", *argv[9:]]) == 2
    assert "needs --word" in capsys.readouterr().err


def test_a_learned_embedding_gives_diffusers_the_same_image(tmp_path_factory) -> None:
    from openldm.train.finetune import FinetuneConfig, finetune
    from tests.oracles import diffusers_pair

    diffusers = pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("ti")
    pair = diffusers_pair(root, "sd1", 64)
    data = _ti_data(root / "data", "zorp")
    config = FinetuneConfig(
        str(data),
        str(root / "out"),
        "textual-inversion",
        steps=6,
        learning_rate=1e-2,
        resolution=64,
        word="zorp",
        init_word="red",
        vectors=2,
    )
    path = finetune(pair.model, config, progress=False)
    assert pair.model.tokenizer.added_words == {}  # the model as it was
    pair.model.load_embedding(path)
    ours = pair.model.txt2img(
        "a zorp square", steps=3, width=64, height=64, seed=2, output_type="np", progress=False
    ).images
    pipe = pair.txt2img
    pipe.load_textual_inversion(str(path), token="zorp")
    noise = torch.randn([1, 4, 8, 8], generator=torch.Generator().manual_seed(2))
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    theirs = pipe(
        "a zorp square", num_inference_steps=3, height=64, width=64, latents=noise, output_type="np"
    ).images
    pipe.unload_textual_inversion()
    assert float(np.abs(ours - theirs).max()) <= 1e-3
