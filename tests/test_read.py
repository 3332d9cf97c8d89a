"""Reading checkpoints: round trips, refusal of code in pickles, and clear errors for bad files."""

from __future__ import annotations

import os
import pickle
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import safetensors.torch
import torch

from openldm.checkpoints.errors import CorruptCheckpointError, UnsafeCheckpointError
from openldm.checkpoints.pickle_machine import Placeholder
from openldm.checkpoints.read import read_state_dict, read_torch_zip


def _mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(4, 2, generator=g).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "f64": torch.randn(2, 2, generator=g).double(),
        "i64": torch.arange(6).reshape(2, 3),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert actual[key].shape == value.shape, key
        assert torch.equal(actual[key], value), key


# --- round trips -------------------------------------------------------------------------------


def test_safetensors_round_trip(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tensors, path)
    _assert_same(read_state_dict(path), tensors)


def test_ckpt_round_trip_keeps_dtypes(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": tensors, "global_step": 1, "epoch": 3}, path)
    _assert_same(read_state_dict(path), tensors)


def test_ckpt_shared_storage_and_views(tmp_path: Path) -> None:
    base = torch.arange(40, dtype=torch.float32).reshape(5, 8)
    tensors = OrderedDict(
        base=base,
        rows=base[1:3],  # offset view
        cols=base[:, 2:5],  # strided view
        transposed=base.t(),
        same=base,  # the very same tensor twice
        half_view=torch.arange(10, dtype=torch.float16)[3:],
    )
    path = tmp_path / "views.ckpt"
    torch.save(tensors, path)
    out = read_state_dict(path)
    _assert_same(out, dict(tensors))
    for key in ("rows", "cols", "transposed"):
        assert out[key].stride() == tensors[key].stride()
        assert out[key].storage_offset() == tensors[key].storage_offset()
    # one storage on disk stays one storage in memory: no copies per view
    ptrs = {out[k].untyped_storage().data_ptr() for k in ("base", "rows", "cols", "transposed", "same")}
    assert len(ptrs) == 1


def test_module_state_dict_with_metadata_and_parameters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    path = tmp_path / "pytorch_model.bin"
    torch.save(net.state_dict(), path)  # an OrderedDict with a _metadata attribute (BUILD opcode)
    _assert_same(read_state_dict(path), dict(net.state_dict()))

    params = {name: p for name, p in net.named_parameters()}  # nn.Parameter objects
    torch.save(params, path)
    out = read_state_dict(path)
    _assert_same(out, {k: v.detach() for k, v in params.items()})
    assert all(type(t) is torch.Tensor and not t.requires_grad for t in out.values())


def test_nested_metadata_is_read_and_state_dict_unwrapped(tmp_path: Path) -> None:
    weights = {"w": torch.ones(2, 2)}
    obj = {
        "state_dict": weights,
        "global_step": 7,
        "meta": {"shape": torch.Size([1, 2]), "dtype": torch.bfloat16, "items": [1, 2.5, "x", None, (True,)]},
    }
    path = tmp_path / "nested.ckpt"
    torch.save(obj, path)
    full = read_torch_zip(path)
    assert full["global_step"] == 7
    assert full["meta"] == obj["meta"]
    _assert_same(read_state_dict(path), weights)


def test_data_is_memory_mapped_copy_on_write(tmp_path: Path) -> None:
    path = tmp_path / "m.ckpt"
    torch.save({"w": torch.zeros(1000)}, path)
    before = path.read_bytes()
    out = read_state_dict(path)
    out["w"].add_(1)  # writable, but writes never reach the file
    assert float(out["w"].sum()) == 1000.0
    assert path.read_bytes() == before


# --- refusing code -----------------------------------------------------------------------------


class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return os.system, (self.command,)


class _CallsTarget:
    """Pickles as a call of ``target(*args)``, with ``target`` pickled by name."""

    def __init__(self, target: object, *args: object) -> None:
        self.target, self.args = target, args

    def __reduce__(self) -> tuple:
        return self.target, self.args


def _torch_zip(path: Path, pickled: bytes, records: dict[str, bytes] | None = None) -> Path:
    """A zip laid out like torch.save's, around a hand-made pickle."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/version", b"3\n")
        for key, data in (records or {}).items():
            z.writestr(f"archive/data/{key}", data)
    return path


def test_pickle_running_os_system_is_refused(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": _RunsCommand(f"touch {sentinel}")}, path)
    with pytest.raises(UnsafeCheckpointError, match="system") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)
    assert not sentinel.exists()


def _call_pickle(module: str, name: str, arg: str, stack_global: bool) -> bytes:
    """A pickle that calls ``module.name(arg)``: GLOBAL (protocol 0) or STACK_GLOBAL (protocol 4)."""
    if not stack_global:
        return f"c{module}\n{name}\n(V{arg}\ntR.".encode()

    def text(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()

    return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(arg) + b"\x85R."


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("builtins", "eval"),
        ("subprocess", "Popen"),
        ("posix", "system"),
        ("os", "system"),
        ("builtins", "exec"),
    ],
)
@pytest.mark.parametrize("stack_global", [False, True])
def test_dangerous_globals_are_refused(tmp_path: Path, module: str, name: str, stack_global: bool) -> None:
    sentinel = tmp_path / "pwned"
    command = f"touch {sentinel}" if name in ("system", "Popen") else f"open({str(sentinel)!r}, 'w')"
    pickled = _call_pickle(module, name, command, stack_global)
    path = _torch_zip(tmp_path / "evil.ckpt", pickled)
    with pytest.raises(UnsafeCheckpointError, match=f"{module}.{name}") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)
    assert not sentinel.exists()


def test_hand_made_call_pickles_do_run_when_allowed(tmp_path: Path) -> None:
    # The pickles above are real attacks: plain pickle runs them (here harmlessly, calling str).
    assert pickle.loads(_call_pickle("builtins", "str", "abc", False)) == "abc"
    assert pickle.loads(_call_pickle("builtins", "str", "abc", True)) == "abc"


def test_named_module_is_never_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sentinel = tmp_path / "imported"
    (tmp_path / "openldm_probe_mod.py").write_text(f"open({str(sentinel)!r}, 'w').close()\nthing = print\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _torch_zip(tmp_path / "probe.ckpt", b"copenldm_probe_mod\nthing\n(S'x'\ntR.")
    with pytest.raises(UnsafeCheckpointError, match="openldm_probe_mod.thing"):
        read_state_dict(path)
    assert not sentinel.exists()
    assert "openldm_probe_mod" not in sys.modules


def test_lightning_callbacks_load_without_lightning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Recreate how Lightning 1.x pickles its callbacks: the ModelCheckpoint *class* is a dict key,
    # an instance with its state appears too. A fake module makes the class picklable by name.
    names = [
        "pytorch_lightning",
        "pytorch_lightning.callbacks",
        "pytorch_lightning.callbacks.model_checkpoint",
    ]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    checkpoint_cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = checkpoint_cls
    instance = checkpoint_cls()
    instance.monitor, instance.best_model_score = "val/loss", torch.tensor(0.25)
    weights = {"model.w": torch.randn(3, 3, generator=torch.Generator().manual_seed(1))}
    path = tmp_path / "lightning.ckpt"
    torch.save(
        {
            "state_dict": weights,
            "global_step": 470000,
            "epoch": 5,
            "pytorch-lightning_version": "1.4.2",
            "callbacks": {
                checkpoint_cls: {"best_model_path": "x.ckpt", "best_model_score": torch.tensor(0.1)}
            },
            "loggers": [instance],
        },
        path,
    )
    for name in names:
        monkeypatch.delitem(sys.modules, name)

    _assert_same(read_state_dict(path), weights)
    assert not any(name in sys.modules for name in names)
    full = read_torch_zip(path)
    (key,) = full["callbacks"]
    assert issubclass(key, Placeholder)
    assert key.qualified_name == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert float(full["callbacks"][key]["best_model_score"]) == pytest.approx(0.1)
    (logged,) = full["loggers"]
    assert isinstance(logged, key) and logged.state["monitor"] == "val/loss"


def test_placeholder_inside_state_dict_is_an_error(tmp_path: Path) -> None:
    import numpy

    pickled = pickle.dumps({"state_dict": {"w": _CallsTarget(numpy.dtype, "f4")}}, protocol=2)
    path = _torch_zip(tmp_path / "odd.ckpt", pickled)
    with pytest.raises(CorruptCheckpointError, match="'w'.*not a tensor"):
        read_state_dict(path)


class _StorageRef:
    """Pickled as a persistent storage reference, as torch.save writes them."""

    def __init__(self, storage_type: object, key: str, numel: int) -> None:
        self.pid = ("storage", storage_type, key, "cpu", numel)


class _PersistentPickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> object:
        return obj.pid if isinstance(obj, _StorageRef) else None


def _tensor_pickle(size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0, numel: int = 4) -> bytes:
    import io

    from torch._utils import _rebuild_tensor_v2  # only its name goes into the pickle

    buf = io.BytesIO()
    ref = _StorageRef(torch.FloatStorage, "0", numel)
    _PersistentPickler(buf, protocol=2).dump(
        {"w": _CallsTarget(_rebuild_tensor_v2, ref, offset, size, stride, False, OrderedDict())}
    )
    return buf.getvalue()


def test_hand_made_tensor_pickle_reads(tmp_path: Path) -> None:
    data = torch.arange(4, dtype=torch.float32).numpy().tobytes()
    path = _torch_zip(tmp_path / "ok.ckpt", _tensor_pickle((2, 2), (2, 1)), {"0": data})
    assert torch.equal(read_state_dict(path)["w"], torch.tensor([[0.0, 1.0], [2.0, 3.0]]))


@pytest.mark.parametrize(
    ("size", "stride", "offset", "numel"),
    [((3, 2), (2, 1), 0, 4), ((2, 2), (2, 1), 1, 4), ((4,), (1,), 0, 9), ((2,), (-1,), 1, 4)],
)
def test_tensor_outside_its_storage_is_refused(
    tmp_path: Path, size: tuple[int, ...], stride: tuple[int, ...], offset: int, numel: int
) -> None:
    data = bytes(16)  # four float32 values
    path = _torch_zip(tmp_path / "oob.ckpt", _tensor_pickle(size, stride, offset, numel), {"0": data})
    with pytest.raises(CorruptCheckpointError, match="oob.ckpt"):
        read_state_dict(path)


# --- damaged or foreign files ------------------------------------------------------------------


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    weights = {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(2))}
    good_st, good_ckpt = tmp_path / "good.safetensors", tmp_path / "good.ckpt"
    safetensors.torch.save_file(weights, good_st)
    torch.save({"state_dict": weights}, good_ckpt)
    files = {
        "truncated.safetensors": good_st.read_bytes()[: good_st.stat().st_size // 2],
        "header-only.safetensors": good_st.read_bytes()[:20],
        "truncated.ckpt": good_ckpt.read_bytes()[: good_ckpt.stat().st_size // 2],
        "text.ckpt": b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 4265380512\n",
        "random.ckpt": torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(3))
        .to(torch.uint8)
        .numpy()
        .tobytes(),
        "empty.safetensors": b"",
        "empty.ckpt": b"",
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    return paths


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("truncated.safetensors", "truncated"),
        ("header-only.safetensors", "truncated"),
        ("truncated.ckpt", "truncated"),
        ("text.ckpt", "Git LFS pointer"),
        ("random.ckpt", "not a safetensors or PyTorch checkpoint"),
        ("empty.safetensors", "empty"),
        ("empty.ckpt", "empty"),
    ],
)
def test_damaged_files_raise_one_clear_error(tmp_path: Path, name: str, expected: str) -> None:
    path = _bad_files(tmp_path)[name]
    with pytest.raises(CorruptCheckpointError) as info:
        read_state_dict(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_plain_text_renamed_ckpt(tmp_path: Path) -> None:
    path = tmp_path / "notes.ckpt"
    path.write_text("these are not weights\n")
    with pytest.raises(CorruptCheckpointError, match="not a safetensors or PyTorch checkpoint") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_legacy_torch_format_says_how_to_convert(tmp_path: Path) -> None:
    path = tmp_path / "old.ckpt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CorruptCheckpointError, match="legacy.*Re-save") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_zip_that_is_not_a_torch_archive(tmp_path: Path) -> None:
    path = tmp_path / "other.ckpt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(CorruptCheckpointError, match="data.pkl"):
        read_state_dict(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CorruptCheckpointError, match="no such file"):
        read_state_dict(tmp_path / "nope.safetensors")
    with pytest.raises(CorruptCheckpointError, match="folder"):
        read_state_dict(tmp_path)


def test_content_decides_not_the_suffix(tmp_path: Path) -> None:
    weights = {"w": torch.ones(3)}
    path = tmp_path / "actually-a-ckpt.safetensors"
    torch.save(weights, path)
    _assert_same(read_state_dict(path), weights)
