"""Native helpers (``openldm.nn.native``): a C source built once per CPU and source into the cache
folder, written whole (no partial file left, a damaged one built again), never built when asked not to,
and None with the compiler's reason logged when it cannot be built; built with OpenMP where PyTorch's
threads are GNU OpenMP's, joining that runtime (no second one loaded), else without it, and a build that
brings a runtime of its own not used for sharing; a call's jobs shared among PyTorch's threads or a
pool's, a job that cannot have its memory raising MemoryError."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from openldm.nn import native


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(native.CACHE_VARIABLE, str(tmp_path))
    return tmp_path


def _load(name: str = "winograd.c") -> native.NativeLibrary | None:
    return native.load.__wrapped__(name)  # not the process's kept library


def _with_functions(**functions: Any) -> native.NativeLibrary:
    """A stand-in library of Python functions, its jobs on a pool."""
    return native.NativeLibrary(SimpleNamespace(**functions), shares_pytorch_threads=False)  # type: ignore[arg-type]


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
    flags = native._flag_sets(native.openmp_runtimes())[0]
    damaged = cache / native._library_name(native.SOURCE_DIR / "winograd.c", cc, flags)
    damaged.write_bytes(b"not a library")  # as a full disk or a killed copy might leave it
    library = _load()
    assert library is not None and hasattr(library.cdll, "winograd4_input")
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
        native.run_jobs(_with_functions(job=job), "job", 7, 0)
    finally:
        torch.set_num_threads(threads)
    assert sorted(span[:2] for span in seen) == [(0, 4), (4, 7)]
    assert all(name.startswith("openldm-native") for *_, name in seen)
    torch.set_num_threads(1)
    try:
        seen.clear()
        native.run_jobs(_with_functions(job=job), "job", 3, 0)  # one thread: called in place
        assert seen == [(0, 3, threading.current_thread().name)]
    finally:
        torch.set_num_threads(threads)


def test_a_job_without_its_memory_raises() -> None:
    def no_memory(begin: int, end: int) -> int:
        return 1

    with pytest.raises(MemoryError, match="no_memory could not allocate"):
        native.run_jobs(_with_functions(no_memory=no_memory), "no_memory", 4)
    shared = native.NativeLibrary(SimpleNamespace(no_memory_shared=lambda jobs, threads: 1), True)  # type: ignore[arg-type]
    with pytest.raises(MemoryError, match="no_memory could not allocate"):
        native.run_jobs(shared, "no_memory", 4)


def test_with_pytorchs_gnu_openmp_the_library_joins_its_threads(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = native.openmp_runtimes()
    assert [Path(file).name for file in before] == ["libgomp.so.1"]  # PyTorch's, on Linux
    library = _load()
    assert library is not None and library.shares_pytorch_threads
    assert native.openmp_runtimes() == before  # built against the libgomp.so.1 PyTorch loaded: no other
    assert hasattr(library.cdll, "winograd4_input_shared") and hasattr(
        library.cdll, "winograd4_output_shared"
    )

    def no_pool(*args: object) -> None:
        raise AssertionError("a pool of openldm's threads was used")

    monkeypatch.setattr(native, "_pool", no_pool)
    seen: list[tuple[int, int]] = []

    def job_shared(tag: int, jobs: int, threads: int) -> int:
        seen.append((jobs, threads))
        return 0

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        native.run_jobs(native.NativeLibrary(SimpleNamespace(job_shared=job_shared), True), "job", 5, 0)  # type: ignore[arg-type]
        native.run_jobs(native.NativeLibrary(SimpleNamespace(job_shared=job_shared), True), "job", 1, 0)  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(threads)
    assert seen == [(5, 2), (1, 1)]  # never more threads than jobs


def test_without_gnu_openmp_the_library_is_built_without_it(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(native, "openmp_runtimes", frozenset)  # as on macOS or Windows: none seen
    library = _load()
    assert library is not None and not library.shares_pytorch_threads
    assert not hasattr(library.cdll, "winograd4_input_shared")


def test_a_build_bringing_its_own_openmp_does_not_share(
    cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seen = iter(
        [frozenset({"/usr/lib/libgomp.so.1"}), frozenset({"/usr/lib/libgomp.so.1", "/opt/libomp.so"})]
    )
    monkeypatch.setattr(native, "openmp_runtimes", lambda: next(seen))  # as clang's -fopenmp would do
    with caplog.at_level(logging.WARNING, logger="openldm"):
        library = _load()
    assert library is not None and not library.shares_pytorch_threads
    assert "brought a runtime of its own (/opt/libomp.so)" in caplog.text
