"""Files made to crash, hang, poison or steer the readers: each answered by one clean error, quickly and
without memory to speak of, and a clean file read afterwards still gives its own tensors.

Every hostile file is built here, tiny, from raw pickle opcodes or zip records.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from openldm.checkpoints.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from openldm.checkpoints.read import read_state_dict, read_torch_zip
from tests.helpers import PRINT_PEAK_KIB

# --- building files --------------------------------------------------------------------------------


def text(s: str) -> bytes:
    """SHORT_BINUNICODE / BINUNICODE of ``s``."""
    raw = s.encode()
    return (b"\x8c" + bytes([len(raw)]) if len(raw) < 256 else b"X" + struct.pack("<I", len(raw))) + raw


def glob(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def torch_zip(path: Path, pickled: bytes, records: dict[str, bytes] | None = None, **write: object) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickled, **write)  # type: ignore[arg-type]
        z.writestr("archive/version", b"3\n")
        for key, data in (records or {}).items():
            z.writestr(f"archive/data/{key}", data)
    return path


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A clean Lightning-style .ckpt (OrderedDict with metadata inside a dict) and its tensors."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    sd = model.state_dict()
    sd["half"] = torch.randn(4).half()
    path = tmp_path_factory.mktemp("clean") / "clean.ckpt"
    torch.save({"state_dict": sd, "global_step": 7, "epoch": 1.5, "tags": ["a", (1, 2)]}, path)
    return path, {k: v.clone() for k, v in sd.items()}


def assert_clean_still_reads(clean: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, expected = clean
    got = read_state_dict(path)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def refused(path: Path, match: str, error: type[Exception] = CheckpointError) -> str:
    with pytest.raises(error, match=match) as info:
        read_state_dict(path)
    message = str(info.value)
    assert len(message) < 2000, len(message)  # bounded, whatever the file holds
    return message


# --- state poisoning across loads ----------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        glob("torch._utils", "_rebuild_tensor_v2"),
        glob("torch", "FloatStorage"),
        glob("torch", "float32"),
        glob("collections", "OrderedDict"),
        glob("torch", "Size"),
    ],
    ids=["rebuild-function", "storage-type", "dtype", "ordereddict-class", "size"],
)
def test_build_on_a_shared_object_changes_nothing(tmp_path, clean, target) -> None:
    # BUILD with a state dict (sets attributes) and with (None, slotstate) on what the allowlist hands out.
    for state in (
        b"}" + text("__defaults__") + b")s",
        b"N}" + text("dtype") + glob("torch", "bfloat16") + b"s\x86",
    ):
        path = torch_zip(tmp_path / "poison.ckpt", b"\x80\x02" + target + state + b"b.")
        refused(path, "changes the state of")
        assert_clean_still_reads(clean)


def test_build_on_a_fresh_ordereddict_drops_its_state(tmp_path, clean) -> None:
    # An OrderedDict whose ``items`` a BUILD would override: the state is dropped, the dict stays a dict.
    pickled = b"\x80\x02" + glob("collections", "OrderedDict") + b")R}" + text("items") + b"K\x05sb."
    assert read_torch_zip(torch_zip(tmp_path / "od.ckpt", pickled)) == {}
    assert_clean_still_reads(clean)


# --- crashes, hangs and memory from tiny files ---------------------------------------------------


def _child(code: str, *args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``code`` in a child Python; its result and its peak memory in GiB (the child prints it)."""
    script = code + PRINT_PEAK_KIB
    result = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout
    )
    return result, int(result.stdout.split()[-1]) / 2**20 if result.stdout.split() else 0.0


READ = """
import sys
from openldm.checkpoints.errors import CheckpointError
from openldm.checkpoints.read import read_state_dict
try:
    read_state_dict(sys.argv[1])
    print("LOADED")
except CheckpointError as e:
    print("CLEAN", type(e).__name__, str(e)[:300].replace(chr(10), " "))
"""


def _hostile_pickles() -> dict[str, bytes]:
    deep = b"\x80\x02N" + b"\x85" * 200_000 + b"."  # a 200,000-deep nested tuple
    shared = b"\x80\x02N" + b"q\x00h\x00\x86" * 40 + b"."  # 2**40 leaves through shared tuples
    shared_key = b"\x80\x02}" + shared[2:-1] + b"N" + b"s."  # ... hashed as a dict key
    memo = b"\x80\x02Nr" + struct.pack("<I", 100_000_000) + b"."  # a memo index of 100,000,000
    collide = bytearray(b"\x80\x02}(")  # integer keys whose hashes collide (multiples of 2**61 - 1)
    for i in range(1, 20_000):
        value = i * (2**61 - 1)
        raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
        collide += b"\x8a" + bytes([len(raw)]) + raw + b"N"
    collide += b"u."
    huge_long = b"\x80\x02\x8b" + struct.pack("<i", 2**30) + b"."
    return {
        "deep-tuple": deep,
        "shared-tuples": shared,
        "shared-tuple-key": shared_key,
        "memo-index": memo,
        "colliding-keys": bytes(collide),
        "huge-integer": huge_long,
    }


@pytest.mark.parametrize("name", list(_hostile_pickles()))
def test_tiny_pickles_cannot_crash_hang_or_grow(tmp_path, name) -> None:
    path = torch_zip(tmp_path / f"{name}.ckpt", _hostile_pickles()[name])
    result, peak = _child(READ, str(path), timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]  # no segmentation fault, no traceback
    assert result.stdout.startswith("CLEAN CorruptCheckpointError"), result.stdout
    assert peak < 1.0, peak  # GiB: torch itself, nothing the file asked for


def test_a_bzip2_bomb_and_a_lying_deflate_header(tmp_path, clean) -> None:
    bomb = tmp_path / "bomb.ckpt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_BZIP2) as z:
        z.writestr("archive/data.pkl", b"\0" * 50_000_000)
    refused(bomb, "compressed with method 12; only stored and deflated")
    big = tmp_path / "big.ckpt"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * (300 * 2**20))  # more than a checkpoint's pickle
    refused(big, "declares 314572800 bytes, more than")
    assert_clean_still_reads(clean)


def test_encrypted_and_unknown_compression_entries(tmp_path) -> None:
    path = torch_zip(tmp_path / "enc.ckpt", b"\x80\x02}.")
    raw = bytearray(path.read_bytes())
    for header in (b"PK\x03\x04", b"PK\x01\x02"):  # set the encryption flag in both headers
        start = raw.find(header)
        offset = start + (6 if header == b"PK\x03\x04" else 8)
        raw[offset] |= 1
    path.write_bytes(bytes(raw))
    refused(path, "is encrypted", UnsafeCheckpointError)
    odd = tmp_path / "lzma.ckpt"
    with zipfile.ZipFile(odd, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}.")
        z.writestr("archive/byteorder", b"little", compress_type=zipfile.ZIP_LZMA)
    refused(odd, "'byteorder' is compressed with method 14")


def test_an_invalid_utf8_file_name(tmp_path) -> None:
    path = torch_zip(tmp_path / "name.ckpt", b"\x80\x02}.")
    raw = bytearray(path.read_bytes())
    for header, flags, name in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
        start = raw.find(header)
        raw[start + flags + 1] |= 0x08  # bit 11: the name is UTF-8
        raw[start + name] = 0xFF  # ... and it is not
    path.write_bytes(bytes(raw))
    refused(path, "damaged or truncated zip archive|no single")


def test_tensor_views_claiming_more_than_their_storage(tmp_path) -> None:
    # Stride-0 views declared to hold 2**28 and 2**62 elements of a 4-element storage.
    for count in (2**28, 2**62):
        pickled = (
            b"\x80\x02}" + text("w") + glob("torch._utils", "_rebuild_tensor_v2")
            + b"((" + text("storage") + glob("torch", "FloatStorage") + text("0") + text("cpu") + b"K\x04tQ"
            + b"K\x00" + b"\x8a\x08" + count.to_bytes(8, "little") + b"\x85" + b"K\x00\x85" + b"\x89"
            + glob("collections", "OrderedDict") + b")R" + b"tRs."
        )  # fmt: skip
        path = torch_zip(tmp_path / f"stats-{count}.ckpt", pickled, {"0": bytes(16)})
        refused(path, f"a tensor of {count} elements")


def test_messages_quote_nothing_unbounded(tmp_path) -> None:
    big = b"\x80\x02" + text("x" * 100_000) + b"Q."  # a 100 KB persistent id
    message = refused(torch_zip(tmp_path / "pid.ckpt", big), "persistent id")
    assert message.count("x") < 100


# --- folders ---------------------------------------------------------------------------------------


def _folder_with_index(root: Path, tiny_folder: Path, weight_map: object) -> Path:
    folder = root / "model"
    shutil.copytree(tiny_folder, folder)
    unet = folder / "unet"
    for file in unet.glob("diffusion_pytorch_model*.safetensors"):
        file.unlink()
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map})
    )
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("diffusers")
    from tests.oracles import Oracles, text_oracle, unet_oracle, vae_oracle, write_diffusers_folder
    from tests.tiny import TINY

    spec = TINY["sd1"]
    folder = tmp_path_factory.mktemp("folder") / "sd1"
    oracles = Oracles(unet_oracle(spec.unet), vae_oracle(spec.vae), text_oracle(spec.text))
    write_diffusers_folder(folder, "sd1", spec, oracles, text_5x=False)
    return folder


def test_a_shard_index_cannot_read_outside_its_folder(tmp_path, tiny_folder) -> None:
    import openldm

    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:the secret line\n")
    outside = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1)}, str(outside))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = {
        "absolute": {"w": str(secret)},
        "parent": {"w": "../../../secret.txt"},
        "absolute-safetensors": {"w": str(outside)},
        "pipe": {"w": str(fifo)},
        "pipe-inside": {"w": "pipe.safetensors"},
        "symlink": {"w": "link.safetensors"},
    }
    for name, weight_map in cases.items():
        folder = _folder_with_index(tmp_path / name, tiny_folder, weight_map)
        (folder / "unet" / "link.safetensors").symlink_to(outside)
        os.mkfifo(folder / "unet" / "pipe.safetensors")  # reading it would hang
        with pytest.raises(CheckpointError) as info:
            openldm.load(folder)
        message = str(info.value)
        assert "outside the folder" in message or "not a regular file" in message, (name, message)
        assert "the secret line" not in message and "root:x" not in message


@pytest.mark.parametrize(
    ("weight_map", "message"),
    [
        ([1, 2], "weight_map is not a non-empty JSON object"),
        ({"w": 5}, "value that is not a string"),
        ({}, "non-empty"),
    ],
)
def test_a_shard_index_of_the_wrong_json_types(tmp_path, tiny_folder, weight_map, message) -> None:
    import openldm

    folder = _folder_with_index(tmp_path, tiny_folder, weight_map)
    with pytest.raises(CorruptCheckpointError, match=message):
        openldm.load(folder)


def test_deeply_nested_json_and_wrong_config_types(tmp_path, tiny_folder) -> None:
    import openldm

    folder = tmp_path / "deep"
    shutil.copytree(tiny_folder, folder)
    (folder / "model_index.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CorruptCheckpointError, match="nested too deep|not a JSON object"):
        openldm.load(folder)
    folder = tmp_path / "types"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["in_channels"] = [4]
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="wrong type|cannot be read"):
        openldm.load(folder)


def test_the_command_line_answers_reading_errors_in_one_line(tmp_path) -> None:
    path = torch_zip(tmp_path / "deep.ckpt", _hostile_pickles()["deep-tuple"])
    result = subprocess.run(
        [sys.executable, "-m", "openldm", "inspect", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("openldm: error: "), result.stderr


def test_a_component_name_cannot_leave_the_folder(tmp_path, tiny_folder) -> None:
    import openldm

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["../../elsewhere"] = ["diffusers", "UNet2DConditionModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeCheckpointError, match="not a plain folder name"):
        openldm.load(folder)


def test_hub_cache_snapshots_may_link_to_their_blobs(tmp_path) -> None:
    from openldm.checkpoints.read import file_inside

    repo = tmp_path / "hub" / "models--org--model"
    snapshot = repo / "snapshots" / "abc123" / "unet"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "blobs" / "f00d").write_bytes(b"x")
    (snapshot / "part.safetensors").symlink_to(repo / "blobs" / "f00d")
    assert file_inside(snapshot, "part.safetensors", "index").resolve() == repo / "blobs" / "f00d"
    (tmp_path / "other").write_bytes(b"y")
    (snapshot / "out.safetensors").symlink_to(tmp_path / "other")  # outside the repository's cache
    with pytest.raises(UnsafeCheckpointError, match="outside the folder"):
        file_inside(snapshot, "out.safetensors", "index")
