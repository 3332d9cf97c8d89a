"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def _chattr(flag: str, path: Path) -> bool:
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


def _writable(folder: Path) -> bool:
    probe = folder / ".probe"
    try:
        probe.write_text("x")
    except OSError:
        return False
    probe.unlink()
    return True


@pytest.fixture
def read_only_folder() -> Iterator[Callable[[Path], Path]]:
    """``make(path)`` creates the folder ``path`` and makes it read-only, for root too (root ignores
    permission bits: the folder is made immutable with ``chattr +i``); undone after the test."""
    made: list[Path] = []

    def make(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        made.append(path)
        if os.geteuid() == 0:
            _chattr("+i", path)
        else:
            path.chmod(0o555)
        if _writable(path):
            pytest.fail(f"could not make {path} read-only on this machine (as root, chattr +i is needed)")
        return path

    yield make
    for path in reversed(made):
        if os.geteuid() == 0:
            _chattr("-i", path)
        else:
            path.chmod(0o755)


@pytest.fixture(scope="session", autouse=True)
def native_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The native helpers (``openldm.nn.native``) built into the session's own cache folder, as on a
    clean machine, and the user's left alone; subprocesses inherit it."""
    from openldm.nn import native

    folder = tmp_path_factory.mktemp("native-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(native.CACHE_VARIABLE, str(folder))
        yield folder


@pytest.fixture(scope="session")
def tiny_single_file(tmp_path_factory) -> Callable[..., Path]:
    """``make(variant, name=None)``: a tiny single file of a ``tests.tiny.TINY`` variant ("sd1",
    "sd1-inpaint"...) with the oracles' seeded random weights, written once per session as
    ``<name>.safetensors`` (default ``tiny-<variant>``; the name is the PNGs' ``Model``)."""
    pytest.importorskip("diffusers")  # the weights come from the oracles
    from tests.oracles import (
        Oracles,
        single_file_state_dict,
        text_oracle,
        unet_oracle,
        vae_oracle,
        write_single_file,
    )
    from tests.tiny import TINY

    made: dict[str, Path] = {}

    def make(variant: str, name: str | None = None) -> Path:
        name = name or f"tiny-{variant}"
        if name not in made:
            spec = TINY[variant]
            oracles = Oracles(unet_oracle(spec.unet), vae_oracle(spec.vae), text_oracle(spec.text))
            path = tmp_path_factory.mktemp("tiny") / f"{name}.safetensors"
            write_single_file(path, single_file_state_dict(variant, spec, oracles))
            made[name] = path
        return made[name]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_single_file: Callable[..., Path]) -> Path:
    """A tiny SD 1 single file with seeded random weights (the oracles' layout and names)."""
    return tiny_single_file("sd1")


@pytest.fixture(scope="module")
def single_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """One torch thread for a module's tests: tiny models gain nothing from threads, and on a busy
    machine OpenMP spinning costs seconds. Then the module's ``ERRORS`` (name -> largest error), if it
    keeps one, is printed: run with ``-s`` to see how close each parity came."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for name, error in sorted(getattr(request.module, "ERRORS", {}).items()):
        if isinstance(error, float):  # a module with a table of its own prints it itself
            print(f"max abs error {name}: {error:.2e}")
