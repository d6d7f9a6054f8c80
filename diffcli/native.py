"""Loader for the optional C++ CPU kernels built by CMakeLists.txt (kernels/native/).

diffcli works without them: `available()` is False and the torch path runs.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def available() -> bool:
    return False


def supports(qtype: str) -> bool:
    return False
