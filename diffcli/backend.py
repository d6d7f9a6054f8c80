"""Which implementation runs the quantized ops, chosen once per device.

- `triton`: fused Triton kernels; the default on CUDA. With `TRITON_INTERPRET=1` it also runs on CPU
  tensors, which is how CI tests the kernels.
- `native`: the C++ library built by CMakeLists.txt; the default on CPU when it is built.
- `torch`: plain torch; always available (CPU, CUDA, MPS).

`DIFFCLI_BACKEND=triton|native|torch` forces one. `set_backend()` lets tests flip it.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("triton", "native", "torch")
_forced: str | None = None


def set_backend(name: str | None) -> None:
    """Force a backend for every device (None: back to automatic choice)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _forced = name
    backend_for.cache_clear()


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def backend_for(device_type: str) -> str:
    """The backend used for tensors on `device_type` ("cpu", "cuda", "mps")."""
    want = _forced or os.environ.get("DIFFCLI_BACKEND") or None
    if want is not None:
        if want not in BACKENDS:
            raise ValueError(f"DIFFCLI_BACKEND={want!r}: choose one of {', '.join(BACKENDS)}")
        if want == "triton" and device_type == "cpu" and not triton_interpret():
            return "torch"   # Triton needs a GPU unless the interpreter is on
        return want
    if device_type == "cuda" and _triton_available():
        return "triton"
    if device_type == "cpu":
        from . import native
        if native.available():
            return "native"
    return "torch"


def backend_of(t: torch.Tensor) -> str:
    return backend_for(t.device.type)
