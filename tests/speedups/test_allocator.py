"""lit_lora.speedups.allocator: after tuning, glibc serves large blocks from its heap instead of fresh mappings."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest

from tests.helpers import ROOT

PROBE = """
import ctypes, ctypes.util, sys
from lit_lora.speedups.allocator import tune_host_allocator

libc = ctypes.CDLL(ctypes.util.find_library("c"))
names = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in names]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def mapped_blocks_while_holding(size):
    block = libc.malloc(size)
    held = libc.mallinfo2().hblks
    libc.free(block)
    return held

base = libc.mallinfo2().hblks
# glibc's default: 20 MiB is mmapped (its threshold then rises to 20 MiB), a later 24 MiB is mmapped too.
default = mapped_blocks_while_holding(20 << 20) - base
tuned = tune_host_allocator()
after = mapped_blocks_while_holding(24 << 20) - base
print(default, tuned, after)
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or "libc.so.6" not in str(ctypes.util.find_library("c")),
    reason="glibc only",
)
def test_tuned_allocator_serves_large_blocks_from_the_heap():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    default, tuned, after = done.stdout.split()
    assert default == "1", "the probe sees glibc's default: a 20 MiB block is a mapping of its own"
    assert tuned == "True"
    assert after == "0", "after tuning a 24 MiB block comes from the heap"
