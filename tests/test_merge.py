"""``openldm merge``: weighted sums and add-differences of tiny single files, with LoRAs baked in."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

import openldm
from openldm.cli import main
from tests.test_adapters import kohya_lora_for

pytestmark = pytest.mark.usefixtures("single_thread")


def _perturbed(source: Path, path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    sd = safetensors.torch.load_file(str(source))
    safetensors.torch.save_file(
        {
            k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in sd.items()
        },
        str(path),
    )
    return path


def _merge(capsys, *argv: object) -> tuple[int, str]:
    code = main(["merge", *(str(a) for a in argv)])
    return code, capsys.readouterr().err


def test_weighted_sum_and_add_difference(tiny_single_file, tmp_path, capsys) -> None:
    a = tiny_single_file("sd1")
    b = _perturbed(a, tmp_path / "b.safetensors", 1)
    c = _perturbed(a, tmp_path / "c.safetensors", 2)
    sa, sb, sc = (safetensors.torch.load_file(str(p)) for p in (a, b, c))
    out = tmp_path / "ab.safetensors"
    assert _merge(capsys, a, b, "--alpha", "0.3", "--out", out)[0] == 0
    merged = safetensors.torch.load_file(str(out))
    assert set(merged) == set(sa)
    for key in sa:
        assert torch.equal(
            merged[key], torch.lerp(sa[key].float(), sb[key].float(), 0.3).to(sa[key].dtype)
        ), key
    out3 = tmp_path / "abc.safetensors"
    assert _merge(capsys, a, b, c, "--alpha", "0.7", "--out", out3, "--dtype", "fp16")[0] == 0
    merged = safetensors.torch.load_file(str(out3))
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    expected = (sa[key].float() + 0.7 * (sb[key].float() - sc[key].float())).half()
    assert merged[key].dtype == torch.float16 and torch.equal(merged[key], expected)
    model = openldm.load(out3)  # a single file openldm (and the web UI) loads
    assert model.spec.variant == "sd1"
    # Alpha 0 gives A back exactly.
    out0 = tmp_path / "a0.safetensors"
    assert _merge(capsys, a, b, "--alpha", "0", "--out", out0)[0] == 0
    assert all(torch.equal(v, sa[k]) for k, v in safetensors.torch.load_file(str(out0)).items())


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_a_baked_lora_equals_the_lora_loaded_at_run_time(tiny_single_file, tmp_path, capsys, variant) -> None:
    a = tiny_single_file(variant)
    b = _perturbed(a, tmp_path / "b.safetensors", 3)
    lora = kohya_lora_for(openldm.load(a), tmp_path / "style.safetensors", seed=4)
    plain, baked = tmp_path / "plain.safetensors", tmp_path / "baked.safetensors"
    assert _merge(capsys, a, b, "--out", plain)[0] == 0
    code, err = _merge(capsys, a, b, "--out", baked, "--lora", f"{lora}:0.7")
    assert code == 0, err
    expected = openldm.load(plain)
    expected.load_lora(lora, 0.7)
    got = openldm.load(baked)
    changed = 0
    for network in ("unet", "text_encoder"):
        ours, theirs = getattr(got, network).state_dict(), getattr(expected, network).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), network
        before = getattr(openldm.load(plain), network).state_dict()
        changed += sum(not torch.equal(before[k], ours[k]) for k in ours)
    assert changed > 20


def test_merge_refuses_what_does_not_fit(tiny_single_file, tmp_path, capsys) -> None:
    a, other = tiny_single_file("sd1"), tiny_single_file("sd2")
    code, err = _merge(capsys, a, other, "--out", tmp_path / "x.safetensors")
    assert code == 2 and "different kinds" in err and err.count("\n") == 1
    code, err = _merge(capsys, a, "--out", tmp_path / "x.safetensors")
    assert code == 2 and "merge takes 2 checkpoints" in err
    code, err = _merge(capsys, a, a, a, "--mode", "weighted-sum", "--out", tmp_path / "x.safetensors")
    assert code == 2 and "merges 2 checkpoints, got 3" in err
    code, err = _merge(capsys, a, a, "--out", a)
    assert code == 2 and "must not be one of the checkpoints" in err
    code, err = _merge(capsys, a, tmp_path, "--out", tmp_path / "x.safetensors")
    assert code == 2 and "B is a folder" in err
    assert not (tmp_path / "x.safetensors").exists()
