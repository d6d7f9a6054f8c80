"""The optional C++ CPU kernels (kernels/native/, built by the top-level CMakeLists.txt).

Legend: T tokens (rows of x), K in-features, N out-features, E experts, F expert width,
A active experts per token.

The library is looked up once: `$DIFFCLI_NATIVE_LIB` if set, else the default build folder
`kernels/native/build/`. Without it `available()` is False and diffcli runs the torch path.
`python -m diffcli.compute.native build [DIR]` configures and builds it with cmake.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from ..errors import InputError
from ..gguf.qtensor import QTensor

ABI_VERSION = 9   # must match DN_ABI_VERSION in kernels/native/diffcli_native.h

# ggml type ids of the formats the library implements.
QTYPE_IDS = {"F32": 0, "F16": 1, "Q5_0": 6, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14, "BF16": 30}

_ERRORS = {-1: "unsupported type", -2: "row length is not a whole number of blocks",
           -3: "expert id out of range"}

_LIB_NAMES = ("libdiffcli_native.so", "libdiffcli_native.dylib", "diffcli_native.dll",
              "Release/diffcli_native.dll")

_lib: ctypes.CDLL | None = None
_searched = False
_threads = 0


def source_dir() -> Path | None:
    """The folder holding CMakeLists.txt (a source checkout), or None for a wheel install."""
    from .. import kernels
    root = Path(kernels.__file__).resolve().parent.parent
    return root if (root / "CMakeLists.txt").is_file() else None


def default_build_dir() -> Path:
    from .. import kernels
    return Path(kernels.__file__).resolve().parent / "native" / "build"


def find_library(build_dir: str | os.PathLike | None = None) -> Path | None:
    env = os.environ.get("DIFFCLI_NATIVE_LIB")
    if env and build_dir is None:
        return Path(env) if Path(env).is_file() else None
    folder = Path(build_dir) if build_dir is not None else default_build_dir()
    for name in _LIB_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.dn_abi_version.restype = i32
    lib.dn_simd.restype = ctypes.c_char_p
    lib.dn_set_threads.argtypes = [i32]
    lib.dn_get_threads.restype = i32
    lib.dn_block_info.argtypes = [i32, ptr, ptr]
    lib.dn_block_info.restype = i32
    lib.dn_dequantize.argtypes = [ptr, i32, i64, ptr]
    lib.dn_qmatmul.argtypes = [ptr, i64, i64, ptr, i32, i64, ptr]
    lib.dn_moe.argtypes = [ptr, i64, i64, ptr, i32, ptr, i32, i64, i64, ptr, ptr, i64, ptr]
    lib.dn_has_bf16.restype = i32
    lib.dn_amx.restype = i32
    lib.dn_amx_available.restype = i32
    lib.dn_set_amx.argtypes = [i32]
    lib.dn_sample.argtypes = [ptr, i64, i64, ptr, ptr]
    lib.dn_sample.restype = i32
    f32 = ctypes.c_float
    lib.dn_vocab.argtypes = [ptr, i64, i64, f32, f32, ptr, ptr, ptr, ptr]
    lib.dn_vocab_from_bf16.argtypes = lib.dn_vocab.argtypes
    lib.dn_draw_bf16.argtypes = [ptr, i64, i64, ptr, ptr]
    lib.dn_qmatmul_t.argtypes = lib.dn_qmatmul.argtypes
    lib.dn_qmatmul_t_bf16.argtypes = lib.dn_qmatmul.argtypes
    for fn in (lib.dn_vocab, lib.dn_vocab_from_bf16, lib.dn_draw_bf16, lib.dn_qmatmul_t,
               lib.dn_qmatmul_t_bf16):
        fn.restype = i32
    lib.dn_qmatmul_bf16.argtypes = lib.dn_qmatmul.argtypes
    lib.dn_moe_bf16.argtypes = lib.dn_moe.argtypes
    lib.dn_has_vnni.restype = lib.dn_q8_simd.restype = i32
    lib.dn_q8_supports.argtypes = [i32]
    lib.dn_q8_supports.restype = i32
    lib.dn_qmatmul_q8.argtypes = lib.dn_qmatmul_q8_bf16.argtypes = lib.dn_qmatmul.argtypes
    lib.dn_moe_q8.argtypes = lib.dn_moe_q8_bf16.argtypes = lib.dn_moe.argtypes
    lib.dn_quantize_q8.argtypes = [ptr, i64, i64, ctypes.c_int, ptr, ptr, ptr, ptr]
    lib.dn_transpose_q8_0.argtypes = [ptr, i32, i64, i64, ptr]
    lib.dn_rms_norm.argtypes = [ptr, ptr, i64, i64, i32, ptr, f32, ptr, f32, ptr]
    lib.dn_rms_rope.argtypes = [ptr, i64, i64, i64, i32, ptr, f32, ptr, ptr, ptr]
    lib.dn_norm_portable.argtypes = [i32]
    lib.dn_to_bf16.argtypes = [ptr, i64, ptr]
    lib.dn_softcap.argtypes = [ptr, i64, f32]
    lib.dn_round_bf16.argtypes = [ptr, i64]
    lib.dn_to_bf16.restype = lib.dn_softcap.restype = lib.dn_round_bf16.restype = i32
    for fn in (lib.dn_dequantize, lib.dn_qmatmul, lib.dn_moe, lib.dn_qmatmul_bf16, lib.dn_moe_bf16,
               lib.dn_qmatmul_q8, lib.dn_qmatmul_q8_bf16, lib.dn_moe_q8, lib.dn_moe_q8_bf16,
               lib.dn_quantize_q8, lib.dn_transpose_q8_0, lib.dn_rms_norm, lib.dn_rms_rope):
        fn.restype = i32
    return lib


def use_library(path: str | os.PathLike | None) -> bool:
    """Load the library at `path` (None: forget it and search again on next use). True if loaded."""
    global _lib, _searched, _threads
    _lib, _searched, _threads = None, path is not None, 0
    if path is not None:
        try:
            lib = _bind(ctypes.CDLL(str(path)))
        except (OSError, AttributeError):
            return False
        if lib.dn_abi_version() != ABI_VERSION:
            return False
        if os.environ.get("DIFFCLI_NATIVE_AMX", "1").strip().lower() in ("0", "off", "no", "false"):
            lib.dn_set_amx(0)
        _lib = lib
    return _lib is not None


def _library() -> ctypes.CDLL | None:
    global _searched
    if not _searched:
        _searched = True
        path = find_library()
        if path is not None:
            use_library(path)
    return _lib


def available() -> bool:
    return _library() is not None


def supports(qtype: str, dtype: torch.dtype = torch.float32) -> bool:
    """Whether ops should route `qtype` here for activations of `dtype`. F32 weights with fp32
    activations are not: the torch path multiplies the zero-copy view with the BLAS, which is
    faster than our kernel, and there is nothing to decode. With bf16 activations they are (the
    torch path would convert the whole weight on every call)."""
    return available() and qtype in QTYPE_IDS and (qtype != "F32" or dtype == torch.bfloat16)


def has_bf16() -> bool:
    """Whether the loaded library multiplies bf16 activations with bf16 dot products
    (AVX512-BF16, or AMX where amx()): the weights of qmatmul, moe and qmatmul_t are decoded, then
    rounded to bf16. Without it bf16 calls are widened to the fp32 kernels (weights unrounded)."""
    lib = _library()
    return lib is not None and bool(lib.dn_has_bf16())


def amx() -> bool:
    """Whether the bf16 matmuls (qmatmul, moe, qmatmul_t) run on Intel AMX tiles: the CPU has
    AMX-BF16, Linux granted the tile state, and neither `DIFFCLI_NATIVE_AMX=0` nor set_amx(False)
    switched it off. The tiles make the same products as the AVX512-BF16 kernels (bf16 operands,
    fp32 sums), summed in another order."""
    lib = _library()
    return lib is not None and bool(lib.dn_amx())


def amx_available() -> bool:
    """Whether this CPU and OS let the library use AMX at all (whatever set_amx says)."""
    lib = _library()
    return lib is not None and bool(lib.dn_amx_available())


def set_amx(on: bool) -> None:
    """Use the AMX kernels where available (True, the default) or the AVX512-BF16 ones."""
    lib = _library()
    if lib is not None:
        lib.dn_set_amx(1 if on else 0)


# Weight types of the int8 kernels (dn_*_q8): per group of 32 values (Q6_K: of 16) an unsigned quant
# with one scale and one offset, used as integers.
Q8_TYPES = ("Q4_K", "Q5_0", "Q6_K", "Q8_0")
_INT8_WORDS = {"1": True, "on": True, "yes": True, "true": True,
               "0": False, "off": False, "no": False, "false": False, "auto": None, "": None}


def _int8_from_env() -> bool | None:
    """DIFFCLI_NATIVE_INT8: 1/on (always), 0/off (never), auto or unset (None: see int8())."""
    raw = os.environ.get("DIFFCLI_NATIVE_INT8", "")
    word = raw.strip().lower()
    if word not in _INT8_WORDS:
        raise InputError(f"DIFFCLI_NATIVE_INT8={raw!r} is not a setting",
                         fix="set it to auto, 1 (on) or 0 (off), or unset it")
    return _INT8_WORDS[word]


_int8: bool | None = None       # set_int8's choice; None: the environment's, else the CPU's


def check_settings() -> None:
    """Raise the InputError of a DIFFCLI_NATIVE_INT8 value that is not a setting."""
    _int8_from_env()


def int8() -> bool:
    """Whether qmatmul and moe multiply with int8 products where the weight types allow it
    (Q8_TYPES): the activations are rounded to int8 per group of 32 values (scale max|x| / 127,
    as llama.cpp's Q8_0) and meet the weights' quants as integers (Q6_K's per half group, one
    scale per 16 values), with fp32 sums. For bf16 activations only: f32 mode keeps its exact
    fp32 products.

    By default (`DIFFCLI_NATIVE_INT8` unset or auto, set_int8(None)) on where they are the
    fastest products the CPU has (q8_simd() is not "portable") and no AMX tiles are in use
    (amx()): AVX512-VNNI (vpdpbusd: 64 products per instruction against vdpbf16ps' 32; a
    real-shape step 1.19x faster on a Zen 4) and AVX2 (vpmaddubsw: 1.3-1.8x the fp32 FMA kernel
    that bf16 activations otherwise widen to, at the experts' 16 rows, on a Zen 3). `=1` or
    set_int8(True) forces it on (portable loops elsewhere), `=0` or False off."""
    if not available():
        return False
    on = _int8 if _int8 is not None else _int8_from_env()
    return q8_simd() != "portable" and not amx() if on is None else on


def set_int8(on: bool | None) -> None:
    """Force the int8 products on (True) or off (False), or back to the default (None: what
    DIFFCLI_NATIVE_INT8 says, else what the CPU makes fastest)."""
    global _int8
    _int8 = None if on is None else bool(on)


def has_vnni() -> bool:
    """Whether the int8 kernels run on AVX512-VNNI (vpdpbusd)."""
    lib = _library()
    return lib is not None and bool(lib.dn_has_vnni())


def q8_simd() -> str:
    """What the int8 kernels run on: "vnni" (AVX512-VNNI), "avx2" (vpmaddubsw: AVX2 builds, and
    AVX-512 ones without VNNI), "portable" (plain loops), or "none" (no library)."""
    lib = _library()
    return ("portable", "avx2", "vnni")[lib.dn_q8_simd()] if lib is not None else "none"


def _q8(kind: str, *qts: QTensor) -> str:
    """The entry-point infix for bf16 activations (kind "_bf16") and these weights: "_q8" when
    int8() and every one has a Q8 type. fp32 activations never take it (f32 mode stays exact)."""
    return "_q8" if kind == "_bf16" and all(q.qtype in Q8_TYPES for q in qts) and int8() else ""


def block_info(qtype: str) -> tuple[int, int]:
    """(values, bytes) per block of `qtype` as the loaded library knows them."""
    lib = _library()
    if lib is None or qtype not in QTYPE_IDS:
        raise ValueError(f"no native kernel for {qtype}")
    elems, size = ctypes.c_int64(), ctypes.c_int64()
    lib.dn_block_info(QTYPE_IDS[qtype], ctypes.byref(elems), ctypes.byref(size))
    return elems.value, size.value


def simd() -> str:
    """The SIMD path compiled into the loaded library ("avx2", "neon", "scalar")."""
    lib = _library()
    return lib.dn_simd().decode() if lib is not None else "none"


def _call(name: str, *args) -> None:
    global _threads
    lib = _library()
    if lib is None:
        raise RuntimeError("diffcli native library is not built; run `python -m diffcli.compute.native build`")
    n = torch.get_num_threads()   # follow torch (and so -t) for the OpenMP pool
    if n != _threads:
        lib.dn_set_threads(n)
        _threads = n
    rc = getattr(lib, name)(*args)
    if rc != 0:
        raise ValueError(f"{name}: {_ERRORS.get(rc, f'error {rc}')}")


# (values, bytes) per block; the C side trusts these sizes, so the bytes are checked here.
_BLOCKS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q5_0": (32, 22),
           "Q4_K": (256, 144), "Q6_K": (256, 210)}


def _raw(qt: QTensor) -> torch.Tensor:
    """The bytes of qt, after checking they are exactly what its type and shape need (the C code
    would otherwise read past the end)."""
    name = qt.name or "tensor"
    if qt.qtype not in QTYPE_IDS:
        raise ValueError(f"{name}: type {qt.qtype} has no native kernel")
    if qt.raw.device.type != "cpu" or qt.raw.dtype != torch.uint8:
        raise ValueError(f"{name}: native kernels need CPU uint8 bytes, got {qt.raw.dtype} on {qt.raw.device}")
    per, size = _BLOCKS[qt.qtype]
    if qt.shape[-1] % per or qt.nbytes != qt.numel // per * size:
        raise ValueError(f"{name}: {qt.nbytes} bytes do not hold a {qt.qtype} tensor of shape {list(qt.shape)}")
    return qt.raw.contiguous()


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float32).contiguous()


def _narrow(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The kernels' fp32 result y in `dtype`: bf16 through dn_to_bf16 (the same rounding as
    y.to(torch.bfloat16), in one parallel pass instead of torch's copy kernel), else y.to."""
    if dtype != torch.bfloat16:
        return y.to(dtype)
    out = torch.empty(y.shape, dtype=torch.bfloat16)
    _call("dn_to_bf16", y.data_ptr(), y.numel(), out.data_ptr())
    return out


def dequantize(qt: QTensor) -> torch.Tensor:
    """qt as float32, shape qt.shape (same values as gguf.quants.dequantize, bit for bit)."""
    raw = _raw(qt)
    out = torch.empty(qt.numel, dtype=torch.float32)
    _call("dn_dequantize", raw.data_ptr(), QTYPE_IDS[qt.qtype], qt.numel, out.data_ptr())
    return out.view(qt.shape)


def _act(x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """x as the kernels take it: bf16 stays bf16 (the *_bf16 entry points), anything else fp32."""
    if x.dtype == torch.bfloat16:
        return x.detach().contiguous(), "_bf16"
    return _f32(x), ""


def qmatmul(x: torch.Tensor, qt: QTensor, out_dtype: torch.dtype | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ qt[N, K].T -> [..., N] in out_dtype (default x.dtype); accumulates in fp32.
    bf16 x: products of bf16-rounded operands (see has_bf16), or int8 ones (see int8). `out`:
    a contiguous fp32 CPU tensor of T * N elements to write the fp32 result into (a buffer kept
    across calls spares the allocation and its page faults: the head's is 268 MB)."""
    N, K = qt.shape
    if x.shape[-1] != K:
        raise ValueError(f"qmatmul: x has {x.shape[-1]} features, {qt.name or 'weight'} expects {K}")
    raw, (xk, kind) = _raw(qt), _act(x.reshape(-1, K))    # xk [T, K]
    if out is None:
        y = torch.empty(xk.shape[0], N, dtype=torch.float32)  # [T, N]
    elif out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous() \
            or out.numel() != xk.shape[0] * N:
        raise ValueError(f"qmatmul: out must be a contiguous fp32 CPU tensor of {xk.shape[0] * N} elements")
    else:
        y = out.view(xk.shape[0], N)
    _call("dn_qmatmul" + _q8(kind, qt) + kind, xk.data_ptr(), xk.shape[0], K, raw.data_ptr(), QTYPE_IDS[qt.qtype], N,
          y.data_ptr())
    return _narrow(y.view(*x.shape[:-1], N), out_dtype or x.dtype)


def qmatmul_t(x: torch.Tensor, qt: QTensor) -> torch.Tensor:
    """x [T, N] @ qt[N, K] -> [T, K] fp32 (the weight's rows are the reduction), e.g.
    softmax(logits) @ E from the embedding's blocks; x fp32 or bf16, fp32 accumulation. bf16 x:
    products with W rounded to bf16 (as transformers' bf16 embedding is; see has_bf16)."""
    N, K = qt.shape
    if x.dim() != 2 or x.shape[-1] != N:
        raise ValueError(f"qmatmul_t: x has shape {list(x.shape)}, {qt.name or 'weight'} has {N} rows")
    raw, (xk, kind) = _raw(qt), _act(x)
    y = torch.empty(xk.shape[0], K, dtype=torch.float32)
    _call("dn_qmatmul_t" + kind, xk.data_ptr(), xk.shape[0], N, raw.data_ptr(), QTYPE_IDS[qt.qtype], K,
          y.data_ptr())
    return y


def transpose_q8_0(qt: QTensor) -> QTensor:
    """qt [N, K] (N a multiple of 32) transposed and requantized: Q8_0 [K, N], rounded as
    gguf.quants' Q8_0, byte for byte. x @ it (qmatmul, int8 products) is x @ qt with the rows as
    the reduction, the int8 form of qmatmul_t."""
    N, K = qt.shape
    if N % 32:
        raise ValueError(f"transpose_q8_0: {qt.name or 'weight'} has {N} rows, not a multiple of 32")
    out = torch.empty(K * N // 32 * 34, dtype=torch.uint8)
    _call("dn_transpose_q8_0", _raw(qt).data_ptr(), QTYPE_IDS[qt.qtype], N, K, out.data_ptr())
    return QTensor(out, "Q8_0", (K, N), f"{qt.name}^T")


def quantize_q8(x: torch.Tensor, qtype: str = "Q4_K") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int8 rounding of the int8 kernels (see int8) for weights of `qtype` (Q8_TYPES):
    x [T, K] (K a multiple of 32) -> (xq [T, K] int8, dx [T, K / 32] fp32, sums) with x ~ dx * xq
    per group of 32 values, dx = max|x| / 127, xq = round-half-even(x * (127 / max|x|)); sums
    for Q4_K sx = dx * sum(xq) per group (fp32 [T, K / 32]), for the others zx = -o * sum(xq)
    (int32 [T, K / 16] for Q6_K, [T, K / 32] else) with o their offset in whole scales (Q5_0 16,
    Q8_0 128, Q6_K 32), where the kernels' integer dot products start."""
    xk = _f32(x)
    if xk.dim() != 2 or xk.shape[1] % 32:
        raise ValueError(f"quantize_q8: x must be [T, K] with K a multiple of 32, got {list(x.shape)}")
    if qtype not in Q8_TYPES:
        raise ValueError(f"quantize_q8: {qtype} has no int8 kernels (they take {', '.join(Q8_TYPES)})")
    T, K = xk.shape
    xq = torch.empty(T, K, dtype=torch.int8)
    dx = torch.empty(T, K // 32)
    if qtype == "Q4_K":
        sums = torch.empty(T, K // 32)
        sx, zx = sums.data_ptr(), None
    else:
        sums = torch.empty(T, K // (16 if qtype == "Q6_K" else 32), dtype=torch.int32)
        sx, zx = None, sums.data_ptr()
    _call("dn_quantize_q8", xk.data_ptr(), T, K, QTYPE_IDS[qtype], xq.data_ptr(), dx.data_ptr(), sx, zx)
    return xq, dx, sums


def moe(x: torch.Tensor, gate_up: QTensor, down: QTensor, ids: torch.Tensor,
        weights: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Routed experts, semantics of ops.moe_experts: x [T, K], gate_up [E, 2F, K], down [E, K, F],
    ids / weights [T, A] -> [T, K] in out_dtype (default x.dtype). bf16 x: the expert input and
    gelu(gate) * up are bf16 operands of the matmuls (fp32 accumulation, fp32 sum over experts),
    or with int8() both are rounded to int8 instead (gelu(gate) * up from fp32)."""
    E, F2, K = gate_up.shape
    F = F2 // 2
    if tuple(down.shape) != (E, K, F) or x.shape[-1] != K or ids.shape != weights.shape \
            or ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe: shapes x {list(x.shape)}, gate_up {list(gate_up.shape)}, "
                         f"down {list(down.shape)}, ids {list(ids.shape)} do not fit together")
    xk, kind = _act(x)                                                # [T, K]
    idx = ids.detach().to(torch.int64).contiguous()                   # [T, A]
    w = _f32(weights)                                                 # [T, A]
    out = torch.empty(xk.shape, dtype=torch.float32)                  # [T, K]
    _call("dn_moe" + _q8(kind, gate_up, down) + kind, xk.data_ptr(), xk.shape[0], K, _raw(gate_up).data_ptr(), QTYPE_IDS[gate_up.qtype],
          _raw(down).data_ptr(), QTYPE_IDS[down.qtype], E, F, idx.data_ptr(), w.data_ptr(),
          idx.shape[1], out.data_ptr())
    return _narrow(out, out_dtype or x.dtype)


def vocab(logits: torch.Tensor, cap: float | None, temperature: float, *, in_place: bool = False):
    """The vocabulary side of a bf16-mode step (dn_vocab): logits [C, V] fp32 or bf16 ->
    (probs [C, V] bf16 = softmax(cap tanh(logits / cap) / temperature), argmax [C] int64,
    lse [C] fp32, entropy [C] fp32). `in_place` with bf16 logits writes probs over them."""
    if logits.dim() != 2 or logits.device.type != "cpu":
        raise ValueError(f"vocab: logits must be a [C, V] CPU tensor, got {list(logits.shape)} on {logits.device}")
    if not temperature > 0:
        raise ValueError(f"vocab: temperature must be > 0, got {temperature}")
    if logits.dtype == torch.bfloat16:
        src, name = logits.contiguous(), "dn_vocab_from_bf16"
    else:
        src, name = _f32(logits), "dn_vocab"
    C, V = src.shape
    probs = src if in_place and src.dtype == torch.bfloat16 and src.data_ptr() == logits.data_ptr() \
        else torch.empty(C, V, dtype=torch.bfloat16)
    argmax = torch.empty(C, dtype=torch.int64)
    lse, entropy = torch.empty(C, dtype=torch.float32), torch.empty(C, dtype=torch.float32)
    _call(name, src.data_ptr(), C, V, float(cap or 0.0), float(temperature), probs.data_ptr(),
          argmax.data_ptr(), lse.data_ptr(), entropy.data_ptr())
    return probs, argmax, lse, entropy


def build(build_dir: str | os.PathLike | None = None, *, quiet: bool = False,
          arch: str | None = None) -> Path:
    """Configure and build the library with cmake; returns the library's path.
    arch: value of -march= (default "native"; "" for the compiler's portable default)."""
    src = source_dir()
    if src is None:
        raise RuntimeError("no CMakeLists.txt next to diffcli (not a source checkout); "
                           "build from a clone of the repository")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RuntimeError("cmake not found; install cmake and a C++17 compiler")
    out = Path(build_dir) if build_dir is not None else default_build_dir()
    pipe = subprocess.DEVNULL if quiet else None
    configure = [cmake, "-S", str(src), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release"]
    if arch is not None:
        configure.append(f"-DDIFFCLI_NATIVE_ARCH={arch}")
    subprocess.run(configure, check=True, stdout=pipe)
    subprocess.run([cmake, "--build", str(out), "--config", "Release", "-j", str(os.cpu_count() or 2)],
                   check=True, stdout=pipe)
    lib = find_library(out)
    if lib is None:
        raise RuntimeError(f"cmake finished but no library was found in {out}")
    return lib


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "build" or len(argv) > 2:
        print("usage: python -m diffcli.compute.native build [BUILD_DIR]", file=sys.stderr)
        return 2
    try:
        lib = build(argv[1] if len(argv) > 1 else None)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"diffcli.compute.native: build failed: {exc}", file=sys.stderr)
        return 1
    ok = use_library(lib)
    print(f"{lib} ({simd()})" if ok else f"{lib} (built, but it does not load)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
