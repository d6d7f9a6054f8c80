"""CPU memory: the freed heap that keep_freed_memory() makes malloc keep (so a denoising step's
[C, V] buffers are reused instead of faulted in again) is given back by return_freed_memory(),
which the model calls once a prefill is done (a 2k-token f32 prefill left ~0.7 GiB of buffers of
other sizes behind, measured in scripts/bench_notes.md)."""
import sys

import pytest
import torch

from diffcli.compute.backend import keep_freed_memory, return_freed_memory


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc tuning is Linux-only")
def test_freed_memory_is_kept_then_returned():
    if not keep_freed_memory():
        pytest.skip("not glibc (mallopt unavailable)")
    size_mib = 256
    x = torch.ones(size_mib * 2**20 // 4)              # touched: all its pages are resident
    before_free = _rss_mib()
    del x
    kept = _rss_mib()
    assert kept > before_free - size_mib / 2             # kept by malloc, not unmapped
    return_freed_memory()
    assert _rss_mib() < kept - size_mib / 2              # its pages went back to the OS
