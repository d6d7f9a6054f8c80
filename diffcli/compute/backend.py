"""Which implementation runs the quantized ops, chosen once per device.

- `triton`: fused Triton kernels; the default on CUDA. With `TRITON_INTERPRET=1` it also runs on CPU
  tensors, which is how CI tests the kernels.
- `native`: the C++ library built by CMakeLists.txt; the default on CPU when it is built.
- `torch`: plain torch; always available (CPU, CUDA, MPS).

`DIFFCLI_BACKEND=triton|native|torch` forces one. `set_backend()` lets tests flip it.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch

from ..errors import InputError
from . import native

BACKENDS = ("triton", "native", "torch")
_forced: str | None = None


def set_backend(name: str | None) -> None:
    """Force a backend for every device (None: back to automatic choice)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _forced = name


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_for(device_type: str) -> str:
    """The backend used for tensors on `device_type` ("cpu", "cuda", "mps").

    Reads the override (`set_backend`, then DIFFCLI_BACKEND) and whether the native library is
    loaded on every call, so a change to either takes effect at once; the choice itself is
    cached."""
    want = _forced or os.environ.get("DIFFCLI_BACKEND") or None
    return _choose(device_type, want, triton_interpret(), native.available())


@functools.lru_cache(maxsize=None)
def _choose(device_type: str, want: str | None, interpret: bool, native_built: bool) -> str:
    if want is not None:
        if want not in BACKENDS:
            raise InputError(f"DIFFCLI_BACKEND={want!r} is not a backend",
                             fix=f"set it to one of {', '.join(BACKENDS)}, or unset it")
        if want == "triton" and device_type == "cpu" and not interpret:
            return "torch"   # Triton needs a GPU unless the interpreter is on
        return want
    if device_type == "cuda" and _triton_available():
        return "triton"
    if device_type == "cpu" and native_built:
        return "native"
    return "torch"


def backend_of(t: torch.Tensor) -> str:
    return backend_for(t.device.type)


@functools.lru_cache(maxsize=None)
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (x86 AVX512-BF16 or AMX-BF16; read from
    /proc/cpuinfo on Linux), or the native library was built with its bf16 dot products."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    if flags & {"avx512_bf16", "amx_bf16"}:
                        return True
                    break
    except OSError:
        pass
    return native.has_bf16()


def cpu_kernels(dtype: torch.dtype | None = None, qtypes=()) -> str:
    """What multiplies the quantized weights on the CPU, for the load line: "native avx512 + AMX",
    "native avx512 bf16", "native avx2", ..., "+ int8" appended where native.int8(), the
    activations are bf16 (`dtype`; int8 products are for bf16 mode only) and some weight type in
    `qtypes` has int8 kernels (native.Q8_TYPES), or "torch" (no native library, or DIFFCLI_BACKEND)."""
    if backend_for("cpu") != "native":
        return "torch"
    kind = f"native {native.simd()}"
    if native.amx():
        kind += " + AMX"
    elif native.has_bf16():
        kind += " bf16"
    int8 = native.int8() and dtype == torch.bfloat16 and any(q in native.Q8_TYPES for q in qtypes)
    return kind + " + int8" if int8 else kind


DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def default_dtype(device: torch.device, *, text: bool = True, qtypes=()) -> torch.dtype:
    """Activation dtype when none is asked for: bfloat16 on accelerators and on CPUs with bf16
    dot products (2-4x the matmul throughput of fp32 there); for the text model (`text`) also on
    CPUs whose native library multiplies bf16 activations with int8 products (native.int8(),
    AVX2 included: a real-shape step 1.44-1.55x faster than float32 on a Zen 3) when the file's
    weight types `qtypes` include one those products take (native.Q8_TYPES: not an F32/F16/BF16
    file, which bf16 mode there would only widen back); float32 on other CPUs, where torch's own
    bf16 ops (the vision tower's, the torch backend's) have no fast path.

    `DIFFCLI_DTYPE=f32|bf16|f16` overrides it everywhere (the CLI's --dtype)."""
    want = os.environ.get("DIFFCLI_DTYPE", "").lower()
    if want and want != "auto":
        if want not in DTYPES:
            raise InputError(f"DIFFCLI_DTYPE={want!r} is not an activation dtype",
                             fix=f"set it to auto or one of {', '.join(DTYPES)}, or unset it")
        return DTYPES[want]
    if device.type != "cpu" or cpu_has_bf16():
        return torch.bfloat16
    fast_int8 = text and any(q in native.Q8_TYPES for q in qtypes) and backend_for("cpu") == "native" \
        and native.q8_simd() != "portable" and native.int8()
    return torch.bfloat16 if fast_int8 else torch.float32


def return_freed_memory() -> None:
    """Give the pages of freed heap memory back to the OS (glibc's malloc_trim), where
    keep_freed_memory() made malloc keep them. Called once a prefill is done: its attention
    scores and expert buffers are of other sizes than a denoising step's [C, V] buffers, so
    kept, they would add to the step's memory instead of being reused by it. A no-op elsewhere
    (load() has already called keep_freed_memory() for a model on the CPU: the result is cached)."""
    if not keep_freed_memory():
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Let glibc's malloc keep large freed CPU buffers for reuse (once per process; True if set).

    A denoising step allocates and frees several [C, V] float32 buffers (32 MB for a 32k vocab,
    268 MB for 262k). Above malloc's mmap threshold (at most 32 MB by default) each one is a fresh
    mmap whose pages fault in one by one on first touch: ~20% of a CPU step on the bench model.
    Raising the mmap and trim thresholds makes them reused heap memory. Process-wide, so load()
    calls it only when the model runs on the CPU; a no-op off Linux/glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) & bool(mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
