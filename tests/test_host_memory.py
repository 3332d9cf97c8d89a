"""Freed memory kept by the C allocator for the next allocation while sampling, and given back after
(openldm.devices.reusing_freed_host_memory), measured in fresh processes: page faults of a large
tensor allocated a second time, resident memory given back on leaving."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from openldm.devices import KEEP_MEMORY_VARIABLE, _glibc

# In a fresh process: allocate and free 256 MB, then allocate 128 MB and touch every page (smaller, as
# small allocations in between may take a corner of the freed block); print that allocation's minor
# page faults, then free it and print how much resident memory leaving the block gave back.
_PROBE = """
import json, resource, torch
from openldm import devices
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def resident():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))
with devices.reusing_freed_host_memory(torch.device("cpu")) as kept:
    first = torch.empty(2**26); first.fill_(1.0); del first
    before = faults()
    second = torch.empty(2**25); second.fill_(2.0)
    after = faults()
    del second
    held = resident()
print(json.dumps({"kept": kept, "faults": after - before, "released": held - resident()}))
"""

pytestmark = pytest.mark.skipif(_glibc() is None, reason="the C library is not glibc (no mallopt)")


def _probe(keep: str) -> dict[str, int]:
    env = {**os.environ, KEEP_MEMORY_VARIABLE: keep}
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults_and_given_back_after() -> None:
    kept = _probe("1")
    assert kept["kept"]
    assert kept["faults"] < 1000  # its 32768 pages of 4 KB come from the heap, already mapped
    assert kept["released"] > 2**28 - 2**24  # the freed 256 MB left the process on leaving
    default = _probe("0")
    assert not default["kept"]
    assert default["faults"] > 30000  # glibc mapped it afresh: every page faulted in again
    assert abs(default["released"]) < 2**24  # glibc had unmapped it at the free: nothing held


def test_only_for_the_cpu_and_left_by_the_outermost_block() -> None:
    import torch

    from openldm import devices

    with devices.reusing_freed_host_memory(torch.device("meta")) as kept:
        assert not kept and devices._keeping[0] == 0
    with devices.reusing_freed_host_memory(torch.device("cpu")) as outer:
        with devices.reusing_freed_host_memory(torch.device("cpu")) as inner:
            assert outer and inner and devices._keeping[0] == 2
        assert devices._keeping[0] == 1  # the outer block (a hires pass's first sampling) still keeps
    assert devices._keeping[0] == 0
