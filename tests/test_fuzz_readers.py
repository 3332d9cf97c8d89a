"""Seeded fuzzing of the checkpoint readers: a few thousand mutated files (a tiny ``.ckpt``'s pickle and
zip, a safetensors header, a diffusers shard index), each read in a child process under a time and a
memory limit. Every one must end in a clean error (:class:`CheckpointError`) or a load of a dict of
tensors; never a crash, a hang, another exception or a MemoryError; and the clean file read after each
must still give its own tensors. Reproducible: the mutations come from ``random.Random(SEED)``.

Run with ``-s`` to see the counts.
"""

from __future__ import annotations

import json
import pickletools
import random
import selectors
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

SEED = 0
COUNTS = {"ckpt-pickle": 1400, "ckpt-zip": 400, "safetensors": 500, "index": 300}
PER_FILE_SECONDS = 20
MEMORY_LIMIT = 6 * 1024**3  # address space of the child: torch's own mappings fit, a bomb does not

WORKER = r"""
import json, resource, signal, sys
import torch
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), int(sys.argv[2])))
from openldm.checkpoints.errors import CheckpointError
from openldm.checkpoints.components import _shards
from openldm.checkpoints.read import read_state_dict
cases = json.loads(open(sys.argv[1]).read())
clean = {k: v.clone() for k, v in read_state_dict(cases["clean"]).items()}

def alarm(*_):
    raise TimeoutError("the read took too long")

signal.signal(signal.SIGALRM, alarm)
for i in range(int(sys.argv[3]), len(cases["files"])):
    kind, path = cases["files"][i]
    print("START", i, flush=True)
    signal.alarm(int(sys.argv[4]))
    try:
        if kind == "index":
            from pathlib import Path
            for shard in _shards(Path(path).parent, Path(path)):
                read_state_dict(shard)
        else:
            loaded = read_state_dict(path)
            assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items())
        outcome = "loaded"
    except CheckpointError as e:
        outcome = "clean"
    except BaseException as e:
        outcome = "bad " + type(e).__name__ + ": " + str(e)[:200].replace("\n", " ")
    signal.alarm(0)
    again = read_state_dict(cases["clean"])
    same = set(again) == set(clean) and all(
        torch.equal(again[k], clean[k]) and again[k].dtype == clean[k].dtype for k in clean
    )
    print("RESULT", i, outcome if same else "poisoned after " + outcome, flush=True)
print("DONE", flush=True)
"""


def _clean_ckpt(folder: Path) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    sd = model.state_dict()
    sd["half"] = torch.randn(3).half()
    path = folder / "clean.ckpt"
    torch.save({"state_dict": sd, "global_step": 7, "epoch": 1.5, "tags": ["a", (1, 2)], "ok": True}, path)
    return path


def _zip_parts(path: Path) -> tuple[bytes, dict[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pickle_name = next(n for n in names if n.endswith("/data.pkl"))
        return z.read(pickle_name), {n: z.read(n) for n in names if n != pickle_name}


def _rezip(path: Path, pickled: bytes, others: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("clean/data.pkl", pickled)
        for name, data in others.items():
            z.writestr(name, data)


ALL_OPCODES = bytes(sorted({op.code.encode("latin-1")[0] for op in pickletools.opcodes}))


def _mutate_pickle(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    positions = [pos for _, _, pos in pickletools.genops(data)]
    choice = rng.randrange(5)
    if choice == 0:  # swap an opcode for another (any of pickle's)
        out[rng.choice(positions)] = rng.choice(ALL_OPCODES)
    elif choice == 1:  # flip bytes
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif choice == 2:  # truncate
        del out[rng.randrange(len(out)) :]
    elif choice == 3:  # insert random bytes at an opcode
        at = rng.choice(positions)
        out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 12)))
    else:  # duplicate a run of opcodes (repeats, nesting, memo reuse)
        start, end = sorted(rng.sample(positions, 2))
        out[end:end] = out[start:end] * rng.randint(1, 50)
    return bytes(out)


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    if rng.random() < 0.3:
        return bytes(out[: rng.randrange(len(out))])
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def _mutate_header(rng: random.Random, path: Path) -> bytes:
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    key = rng.choice([k for k in header if k != "__metadata__"])
    field = rng.choice(["dtype", "shape", "data_offsets", "length", "bytes"])
    weird = rng.choice([-1, 0, 2**62, "F64", [1, -2], [2**40, 2**40], "x" * 1000, None, [[1]], 1.5])
    if field == "length":
        return (rng.choice([0, size - 1, size + 7, 2**63])).to_bytes(8, "little", signed=False) + raw[8:]
    if field == "bytes":
        return _mutate_bytes(rng, raw)
    header[key][field] = weird
    body = json.dumps(header).encode()
    return len(body).to_bytes(8, "little") + body + raw[8 + size :]


def _mutate_index(rng: random.Random) -> str:
    values = [
        "part.safetensors",
        "../part.safetensors",
        "/etc/passwd",
        "",
        "a" * 5000,
        "sub/../../part.safetensors",
        "missing.safetensors",
        "pipe",
        5,
        None,
        ["part.safetensors"],
        {"a": 1},
    ]
    weight_map: object = {f"w{i}": rng.choice(values) for i in range(rng.randint(0, 4))}
    if rng.random() < 0.2:
        weight_map = rng.choice([[], "part.safetensors", 3, None, [["w", "part.safetensors"]]])
    text = json.dumps({"metadata": {}, "weight_map": weight_map})
    if rng.random() < 0.2:
        text = text[: rng.randrange(len(text))]
    if rng.random() < 0.1:
        text = "[" * 50_000 + "]" * 50_000
    return text


def _files(root: Path) -> dict[str, object]:
    rng = random.Random(SEED)
    clean = _clean_ckpt(root)
    pickled, others = _zip_parts(clean)
    files: list[tuple[str, str]] = []
    for i in range(COUNTS["ckpt-pickle"]):
        path = root / f"p{i}.ckpt"
        _rezip(path, _mutate_pickle(rng, pickled), others)
        files.append(("ckpt", str(path)))
    raw = clean.read_bytes()
    for i in range(COUNTS["ckpt-zip"]):
        path = root / f"z{i}.ckpt"
        path.write_bytes(_mutate_bytes(rng, raw))
        files.append(("ckpt", str(path)))
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.ones(2, dtype=torch.float16),
    }
    save_file(tensors, str(root / "clean.safetensors"))
    for i in range(COUNTS["safetensors"]):
        path = root / f"s{i}.safetensors"
        path.write_bytes(_mutate_header(rng, root / "clean.safetensors"))
        files.append(("safetensors", str(path)))
    folder = root / "folder"
    folder.mkdir()
    save_file(tensors, str(folder / "part.safetensors"))
    import os

    os.mkfifo(folder / "pipe")
    for i in range(COUNTS["index"]):
        path = folder / f"i{i}.index.json"
        path.write_text(_mutate_index(rng))
        files.append(("index", str(path)))
    return {"clean": str(clean), "files": files}


def _run(cases_file: Path, start: int) -> tuple[dict[int, str], int | None, str]:
    """Run the worker from file ``start``; its results, the file it stopped at (None: all done) and why."""
    argv = [
        sys.executable,
        "-c",
        WORKER,
        str(cases_file),
        str(MEMORY_LIMIT),
        str(start),
        str(PER_FILE_SECONDS),
    ]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
    results: dict[int, str] = {}
    current: int | None = None
    while True:
        if not selector.select(timeout=PER_FILE_SECONDS * 3 + 60):
            process.kill()
            return results, current, "hang"
        line = process.stdout.readline()  # type: ignore[union-attr]
        if not line:
            process.wait()
            return results, current, f"crash (exit {process.returncode}): {process.stderr.read()[-500:]}"  # type: ignore[union-attr]
        word, *rest = line.strip().split(" ", 2)
        if word == "START":
            current = int(rest[0])
        elif word == "RESULT":
            results[int(rest[0])] = rest[1]
        elif word == "DONE":
            process.wait()
            return results, None, ""


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs a POSIX system")
def test_mutated_files_end_in_clean_errors_or_loads(tmp_path: Path) -> None:
    cases = _files(tmp_path)
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(json.dumps(cases))
    results: dict[int, str] = {}
    failures: list[str] = []
    start = 0
    while start is not None and start < len(cases["files"]):  # type: ignore[arg-type]
        found, stopped, why = _run(cases_file, start)
        results.update(found)
        if stopped is None:
            break
        failures.append(f"{cases['files'][stopped]}: {why}")  # type: ignore[index]
        start = stopped + 1
    counts = {
        "tried": len(cases["files"]),  # type: ignore[arg-type]
        "clean errors": sum(r == "clean" for r in results.values()),
        "loads": sum(r == "loaded" for r in results.values()),
    }
    bad = [f"{cases['files'][i]}: {r}" for i, r in sorted(results.items()) if r not in ("clean", "loaded")]  # type: ignore[index]
    print(f"\nfuzzed readers: {counts}, crashes/hangs {len(failures)}, other outcomes {len(bad)}")
    for line in failures + bad:
        print(line)
    assert failures == [] and bad == [], (failures[:5], bad[:5])
    assert counts["clean errors"] + counts["loads"] == counts["tried"]
    assert counts["loads"] > 50 and counts["clean errors"] > 1000  # the mutations reach both outcomes
