"""The native library built for each SIMD path this CPU can run, shared by the kernel test modules.

`lib` (a module-scoped fixture, imported by tests/test_native.py and tests/test_native_q8.py) is
parametrized over the builds: -march=native, on x86 also the x86-64 baseline (the scalar
kernels) and haswell (the AVX2 ones) on an AVX-512 CPU, and on a CPU with AMX the native build
once more with the tiles switched off (the AVX512-BF16 kernels). Each build is compiled once per
test session, whichever module asks first.
"""
from __future__ import annotations

import platform
import shutil

import pytest

from diffcli.compute import native
from diffcli.compute.backend import set_backend

NO_AMX = "native/no-amx"      # the native build with the AMX kernels switched off

_built: dict[str, object] = {}


def cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def arches() -> list[str]:
    out = ["native"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags = cpu_flags()
        if {"amx_bf16", "amx_tile"} <= flags:
            out.append(NO_AMX)                               # AVX512-BF16 kernels on an AMX CPU
        out.append("")                                       # x86-64 baseline: scalar kernels
        if {"avx512f", "avx2"} <= flags:
            out.append("haswell")                            # AVX2 kernels on an AVX-512 CPU
    return out


@pytest.fixture(scope="module", params=arches(), ids=lambda a: f"march={a or 'default'}")
def lib(request, tmp_path_factory):
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("cmake or a C++ compiler is missing, so the native library cannot be built")
    arch = "native" if request.param == NO_AMX else request.param
    if arch not in _built:
        _built[arch] = native.build(tmp_path_factory.mktemp("native-build"), quiet=True, arch=arch)
    path = _built[arch]
    assert native.use_library(path), f"{path} was built but does not load"
    expected = {"": "scalar", "haswell": "avx2"}.get(request.param)
    assert expected is None or native.simd() == expected
    if request.param == NO_AMX:
        native.set_amx(False)
        assert not native.amx()
    yield path
    native.set_amx(True)
    native.use_library(None)
    set_backend(None)
