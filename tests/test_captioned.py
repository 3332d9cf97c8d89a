"""Training data as people keep it: folders with .txt captions, metadata.jsonl, webdataset shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from openldm.train.captioned import DataError, bucket_of, bucketed, buckets, fit, read_captioned


def _png(size: tuple[int, int], colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _folder(root: Path) -> Path:
    root.mkdir()
    (root / "a.png").write_bytes(_png((64, 64)))
    (root / "a.txt").write_text("a red square\n")
    (root / "wide.png").write_bytes(_png((128, 64)))
    (root / "wide.txt").write_text("a wide red band")
    (root / "sub").mkdir()
    (root / "sub" / "b.jpg").write_bytes(_png((64, 96)))  # a PNG named .jpg: read by its content
    (root / "sub" / "b.txt").write_text("a tall one")
    (root / "broken.png").write_bytes(_png((64, 64))[:40])  # cut short
    (root / "broken.txt").write_text("never read")
    (root / "nocaption.png").write_bytes(_png((64, 64)))
    (root / "notes.md").write_text("ignored")
    return root


def test_a_folder_with_txt_captions(tmp_path) -> None:
    report = read_captioned(_folder(tmp_path / "data"))
    assert sorted(Path(s.name).name for s in report.samples) == ["a.png", "b.jpg", "wide.png"]
    assert {s.caption for s in report.samples} == {"a red square", "a wide red band", "a tall one"}
    assert [Path(n).name for n, _ in report.unreadable] == ["broken.png"]
    assert [Path(n).name for n in report.uncaptioned] == ["nocaption.png"]
    assert report.summary() == "3 images with captions; 1 unreadable, 1 without a caption left out"
    with pytest.raises(
        DataError, match=r"2 images cannot be used: .*broken.png .*nocaption.png \(no caption\)"
    ):
        read_captioned(tmp_path / "data", on_problem="stop")


def test_metadata_jsonl_and_webdataset_shards(tmp_path) -> None:
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    (folder / "x.png").write_bytes(_png((64, 64)))
    (folder / "y.png").write_bytes(_png((64, 64)))
    lines = [{"file_name": "x.png", "text": "first"}, {"file_name": "y.png", "caption": "second"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    assert sorted(s.caption for s in read_captioned(folder).samples) == ["first", "second"]

    shard = tmp_path / "shards" / "000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for name, data in [
            ("k1.png", _png((64, 64))),
            ("k1.txt", b"from a txt"),
            ("k2.jpg", _png((64, 64))),
            ("k2.json", json.dumps({"caption": "from a json"}).encode()),
            ("k3.png", _png((64, 64))),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    report = read_captioned(shard.parent)
    assert sorted(s.caption for s in report.samples) == ["from a json", "from a txt"]
    assert report.uncaptioned == ["000.tar:k3"]
    (folder / "metadata.jsonl").write_text("{not json")
    with pytest.raises(DataError, match="line 1 is not a JSON object"):
        read_captioned(folder)


def test_aspect_buckets_resize_and_crop(tmp_path) -> None:
    sizes = buckets(512)
    assert sizes == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    assert bucket_of(Image.new("RGB", (1024, 512)), sizes) == (640, 384)
    assert bucket_of(Image.new("RGB", (512, 1024)), sizes) == (384, 640)
    assert bucket_of(Image.new("RGB", (600, 580)), sizes) == (512, 512)
    groups = bucketed(read_captioned(_folder(tmp_path / "data")), 64)
    assert {size: [Path(s.name).name for s in samples] for size, samples in groups.items()} == {
        (64, 64): ["a.png"],
        (64, 128): ["b.jpg"],
        (128, 64): ["wide.png"],
    }
    image = Image.new("RGB", (100, 50))
    image.paste((255, 255, 255), (0, 0, 50, 50))  # the left half white
    left, centre = fit(image, (64, 64), 0.0), fit(image, (64, 64), 0.5)
    assert left.shape == centre.shape == (3, 64, 64) and float(left.min()) >= -1 and float(left.max()) <= 1
    assert float(left.mean()) > float(centre.mean())  # the left crop sees more of the white half
    assert torch.allclose(fit(Image.new("RGB", (64, 64), (255, 0, 0)), (64, 64))[0], torch.ones(64, 64))
