"""Freed memory kept by the C allocator for the next allocation (openldm.devices.keep_freed_host_memory),
measured in fresh processes: page faults of a large tensor allocated a second time, and the free
memory that openldm counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from openldm.devices import KEEP_MEMORY_VARIABLE, _glibc

# In a fresh process: allocate and free 256 MB, then allocate 128 MB and touch every page (smaller, as
# small allocations in between may take a corner of the freed block); print the second allocation's
# minor page faults and how much more free memory openldm counts than the kernel.
_PROBE = """
import json, resource, torch
from openldm import devices
kept = devices.keep_freed_host_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
first = torch.empty(2**26); first.fill_(1.0); del first
before = faults()
second = torch.empty(2**25); second.fill_(2.0)
after = faults()
held = devices.available_memory(torch.device("cpu")) - devices._host_available()
print(json.dumps({"kept": kept, "faults": after - before, "held": held}))
"""

pytestmark = pytest.mark.skipif(_glibc() is None, reason="the C library is not glibc (no mallopt)")


def _probe(keep: str) -> dict[str, int]:
    env = {**os.environ, KEEP_MEMORY_VARIABLE: keep}
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults_and_counted_free() -> None:
    kept = _probe("1")
    assert kept["kept"]
    assert kept["faults"] < 1000  # its 32768 pages of 4 KB come from the heap, already mapped
    assert kept["held"] >= 2**27 - 2**20  # the rest of the freed 256 MB is free for the memory check
    default = _probe("0")
    assert not default["kept"]
    assert default["faults"] > 30000  # glibc mapped it afresh: every page faulted in again
    assert default["held"] == 0
