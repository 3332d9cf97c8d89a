"""Native helpers (``openldm.nn.native``): a C source built once per CPU and source into the cache
folder, written whole (no partial file left, a damaged one built again), never built when asked not to,
and None with the compiler's reason logged when it cannot be built; a call's jobs shared among
PyTorch's threads, a job that cannot have its memory raising MemoryError."""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import pytest
import torch

from openldm.nn import native


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(native.CACHE_VARIABLE, str(tmp_path))
    return tmp_path


def _load(name: str = "winograd.c") -> ctypes.CDLL | None:
    return native.load.__wrapped__(name)  # not the process's kept library


def test_a_library_is_built_once_into_the_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _load() is not None
    (built,) = cache.iterdir()
    assert built.name.startswith("winograd-") and built.suffix == ".so"
    made = built.stat().st_mtime_ns

    def no_compiling(*args: object, **kwargs: object) -> None:
        raise AssertionError("compiled again")

    monkeypatch.setattr(native.subprocess, "run", no_compiling)
    assert _load() is not None
    assert list(cache.iterdir()) == [built] and built.stat().st_mtime_ns == made


def test_a_damaged_library_is_built_again(cache: Path) -> None:
    cc = native.compiler()
    assert cc is not None
    damaged = cache / native._library_name(native.SOURCE_DIR / "winograd.c", cc, native.FLAG_SETS[0])
    damaged.write_bytes(b"not a library")  # as a full disk or a killed copy might leave it
    library = _load()
    assert library is not None and hasattr(library, "winograd4_input")
    assert list(cache.iterdir()) == [damaged] and damaged.stat().st_size > 1000


def test_names_change_with_the_source_and_flags(tmp_path: Path) -> None:
    first, second = tmp_path / "a.c", tmp_path / "b.c"
    first.write_text("int f(void) { return 1; }\n")
    second.write_text("int f(void) { return 2; }\n")
    names = {
        native._library_name(first, "cc", ("-O3",)),
        native._library_name(first, "cc", ("-O2",)),
        native._library_name(second, "cc", ("-O3",)),
    }
    assert len(names) == 3


def test_a_failing_compiler_gives_none_and_says_why(
    cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", "false")  # exits 1, says nothing
    with caplog.at_level(logging.WARNING, logger="openldm"):
        assert _load() is None
    assert "could not build winograd.c" in caplog.text and "exit status 1" in caplog.text
    assert list(cache.iterdir()) == []  # no partial file left


def test_no_compiler_or_turned_off_gives_none(
    cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", "no-such-compiler-here")
    with caplog.at_level(logging.WARNING, logger="openldm"):
        assert _load() is None
    assert "no C compiler found" in caplog.text
    monkeypatch.delenv("CC")
    monkeypatch.setenv(native.NATIVE_VARIABLE, "0")
    assert _load() is None and list(cache.iterdir()) == []


def test_jobs_are_shared_among_threads() -> None:
    seen: list[tuple[int, int, str]] = []

    def job(tag: int, begin: int, end: int) -> int:
        seen.append((begin, end, threading.current_thread().name))
        return 0

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        native.run_jobs(job, 7, 0)
    finally:
        torch.set_num_threads(threads)
    assert sorted(span[:2] for span in seen) == [(0, 4), (4, 7)]
    assert all(name.startswith("openldm-native") for *_, name in seen)
    torch.set_num_threads(1)
    try:
        seen.clear()
        native.run_jobs(job, 3, 0)  # one thread: called in place
        assert seen == [(0, 3, threading.current_thread().name)]
    finally:
        torch.set_num_threads(threads)


def test_a_job_without_its_memory_raises() -> None:
    def no_memory(begin: int, end: int) -> int:
        return 1

    with pytest.raises(MemoryError, match="no_memory could not allocate"):
        native.run_jobs(no_memory, 4)
