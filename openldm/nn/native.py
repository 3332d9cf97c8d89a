"""Native helpers: small C sources shipped with the package, compiled for this machine's CPU on first use
and called through ctypes, with the work of a call shared among PyTorch's number of threads.

A library is built once by the C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) into the cache
folder (``$OPENLDM_CACHE``, else ``$XDG_CACHE_HOME/openldm``, else ``~/.cache/openldm``), named by a
hash of its source, the compiler, its flags and the CPU, so a folder shared by machines with other CPUs
or a changed source never loads a stale build; it is written beside its final name and renamed when
whole. Where no compiler works, or with ``OPENLDM_NATIVE=0``, :func:`load` returns None (saying why,
once) and callers compute with PyTorch's operators instead: the same results, slower.

A call's jobs run on PyTorch's own threads where it can: where PyTorch's threads are GNU OpenMP's (its
Linux builds), the library is built with ``-fopenmp`` too, joins that runtime (the one ``libgomp.so.1``
the process has) and shares a call's jobs among its threads. Elsewhere a pool of openldm's threads does;
on PyTorch's threads the calls run sooner, since after each of PyTorch's operators its threads wait
spinning, and threads of openldm's own would compete with them for the cores (one F(4x4) layer of 320
channels at 96x96 on 2 cores: 80 ms on a pool, 71 ms on PyTorch's threads).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from openldm.files import replaced_when_done

log = logging.getLogger("openldm")

NATIVE_VARIABLE = "OPENLDM_NATIVE"  # "0": never compile nor load native helpers
CACHE_VARIABLE = "OPENLDM_CACHE"
COMPILE_SECONDS = 120
SOURCE_DIR = Path(__file__).resolve().parent
# Tuned for the CPU it runs on first; plain -O3 where the compiler does not know -march=native.
FLAG_SETS = (("-O3", "-march=native"), ("-O3",))
OPENMP_FLAG = "-fopenmp"
OPENMP_RUNTIMES = ("libgomp", "libomp", "libiomp")  # GNU's, LLVM's, Intel's: file names begin so


def cache_dir() -> Path:
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "openldm"


def compiler() -> str | None:
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next((found for name in candidates if (found := shutil.which(name))), None)


def _cpu() -> str:
    """What names this CPU's instruction set: its model and flags where Linux tells them."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        info = ""
    wanted = ("model name", "flags", "Features", "CPU part")
    lines = [line for line in info.splitlines() if line.split(":")[0].strip() in wanted]
    return "\n".join(dict.fromkeys(lines)) + platform.machine() + platform.processor()


def _library_name(source: Path, cc: str, flags: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for part in (source.read_bytes(), cc.encode(), " ".join(flags).encode(), _cpu().encode()):
        digest.update(part + b"\0")
    return f"{source.stem}-{digest.hexdigest()[:16]}{'.dll' if os.name == 'nt' else '.so'}"


class BuildError(RuntimeError):
    """A native helper's source that the C compiler would not build."""


def _build(source: Path, cc: str, flags: tuple[str, ...], target: Path) -> None:
    """Compiles ``source`` into ``target``, written beside it and renamed when whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with replaced_when_done(target) as partial:
        command = [cc, *flags, "-shared", "-fPIC", "-o", str(partial), str(source)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_SECONDS)
        if done.returncode != 0:
            said = (done.stderr + done.stdout).splitlines()
            raise BuildError(
                next((line for line in said if "error" in line), f"exit status {done.returncode}")
            )


def _load_or_build(source: Path, cc: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    target = cache_dir() / _library_name(source, cc, flags)
    if target.exists():
        try:
            return ctypes.CDLL(str(target))
        except OSError:
            pass  # a damaged file: built again
    _build(source, cc, flags, target)
    return ctypes.CDLL(str(target))


@dataclass(frozen=True)
class NativeLibrary:
    """A built library; with ``shares_pytorch_threads`` it was built with OpenMP, joined the runtime
    PyTorch's threads are, and each of its job functions ``f`` has a form ``f_shared`` taking
    ``(..., jobs, threads)`` that shares the jobs among those threads."""

    cdll: ctypes.CDLL
    shares_pytorch_threads: bool


def openmp_runtimes() -> frozenset[str]:
    """The files of the OpenMP runtimes mapped into this process (from Linux's /proc; none elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    files = (line.rpartition(" ")[2] for line in maps.splitlines())
    return frozenset(file for file in files if Path(file).name.startswith(OPENMP_RUNTIMES))


def _flag_sets(runtimes: frozenset[str]) -> list[tuple[str, ...]]:
    """With OpenMP first where PyTorch's threads are GNU OpenMP's (gcc's -fopenmp then needs the
    libgomp.so.1 PyTorch has loaded), then without."""
    if not any(Path(file).name.startswith("libgomp") for file in runtimes):
        return list(FLAG_SETS)
    return [(*flags, OPENMP_FLAG) for flags in FLAG_SETS] + list(FLAG_SETS)


@functools.cache
def load(source_name: str) -> NativeLibrary | None:
    """The library built from ``source_name`` (a C file beside this module), or None when it cannot
    be had here (the reason logged once)."""
    if os.environ.get(NATIVE_VARIABLE, "1") == "0":
        return None
    cc = compiler()
    if cc is None:
        log.warning("no C compiler found (set CC): %s runs on PyTorch's operators, slower", source_name)
        return None
    reasons = []
    runtimes = openmp_runtimes()
    for flags in _flag_sets(runtimes):
        try:
            cdll = _load_or_build(SOURCE_DIR / source_name, cc, flags)
        except (OSError, subprocess.SubprocessError, BuildError) as e:
            reasons.append(f"{' '.join(flags)}: {e}")
            continue
        brought = openmp_runtimes() - runtimes if OPENMP_FLAG in flags else frozenset()
        if brought:
            log.warning(
                "%s built with OpenMP brought a runtime of its own (%s): its jobs run on openldm's threads",
                source_name,
                ", ".join(sorted(brought)),
            )
        if reasons:
            log.info("%s built without OpenMP (%s)", source_name, "; ".join(reasons))
        return NativeLibrary(cdll, shares_pytorch_threads=OPENMP_FLAG in flags and not brought)
    log.warning(
        "could not build %s (%s): it runs on PyTorch's operators, slower", source_name, "; ".join(reasons)
    )
    return None


@functools.cache
def _pool(pid: int, threads: int) -> concurrent.futures.ThreadPoolExecutor:
    del pid  # a forked process makes its own threads
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="openldm-native")


def run_jobs(library: NativeLibrary, name: str, jobs: int, *args: int | None) -> None:
    """Runs ``library``'s job function ``name`` over jobs ``range(jobs)`` shared among PyTorch's number
    of threads: ``name_shared(*args, jobs, threads)`` on PyTorch's own threads where the library shares
    them, else ``name(*args, begin, end)`` on one range per thread of a pool (ctypes lets go of the GIL
    for the call). A function returns non-zero when it could not have its scratch memory."""
    threads = max(1, min(torch.get_num_threads(), jobs))
    if library.shares_pytorch_threads:
        failed = [getattr(library.cdll, f"{name}_shared")(*args, jobs, threads)]
    else:
        function: Callable[..., int] = getattr(library.cdll, name)
        step = -(-jobs // threads)
        ranges = [(begin, min(jobs, begin + step)) for begin in range(0, jobs, step)]
        if len(ranges) == 1:
            failed = [function(*args, *ranges[0])]
        else:
            pool = _pool(os.getpid(), threads)
            failed = list(pool.map(lambda span: function(*args, *span), ranges))
    if any(failed):
        raise MemoryError(f"native {name} could not allocate its scratch memory")
