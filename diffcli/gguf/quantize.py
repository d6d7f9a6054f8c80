"""Numpy quantisers for the converter: float32 rows -> ggml blocks (spec §A.6 layouts).

Q8_0 and Q5_0 follow the ggml reference rounding step for step, so their bytes equal
`gguf.quants.quantize` (tests/test_quantize.py checks that bit for bit). `gguf` 0.19 cannot produce
Q4_K or Q6_K; the two quantisers here are our own simple ones (one pass, scales rounded *up* so the
grid always covers the block, values rounded to the nearest grid point), not llama.cpp's iterative
search, so their bytes differ from `llama-quantize` while the layout is the same. Their error bound
is stated at each function and tested.

Every function takes `x` float32 `[..., n]` (rows along the last axis, `n` a multiple of the block
size) and returns uint8 `[..., n // block * type_size]`. Legend: B blocks, S sub-blocks, Q values per
block.
"""
from __future__ import annotations

import numpy as np

QK = 32      # elements per Q8_0 / Q5_0 block
QK_K = 256   # elements per K-quant super-block

# qtype -> (elements per block, bytes per block)
BLOCK = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q8_0": (32, 34), "Q5_0": (32, 22), "Q4_K": (256, 144), "Q6_K": (256, 210),
}
FLOAT_TYPES = ("F32", "F16", "BF16")

# Elements per chunk: keeps the temporaries in cache-sized pieces however large the tensor is.
_CHUNK_ELEMENTS = 1 << 18


def _round_away(v: np.ndarray) -> np.ndarray:
    """Round half away from zero (C `roundf`), exact in float32: the fraction a - floor(a) is exact."""
    a = np.abs(v)
    fl = np.floor(a)
    return np.copysign(fl + (a - fl >= 0.5), v)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 [..., 1] -> the little-endian IEEE half bytes [..., 2]."""
    return v.astype("<f2").view(np.uint8)


def _f16_at_least(v: np.ndarray) -> np.ndarray:
    """The smallest f16 >= v (v >= 0), as float32: a stored scale must never shrink the grid."""
    h = v.astype(np.float16)
    low = h.astype(np.float32) < v
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h.astype(np.float32)


def quantize_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bytes: round to nearest even on the upper 16 bits; NaNs stay (quiet) NaNs."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    # uint32 can only wrap here for NaN inputs, which take the other branch
    with np.errstate(over="ignore"):
        rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    quiet = (u >> np.uint32(16)) | np.uint32(0x40)
    out = np.where(nan, quiet, rounded).astype("<u2")
    return out.view(np.uint8).reshape(*x.shape[:-1], x.shape[-1] * 2)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """Q8_0: per 32 values `d = amax / 127`, `q = round(x / d)` (half away from zero)."""
    b = x.reshape(-1, QK)                                        # [B, 32]
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)   # [B, 1]
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = _round_away(b * inv).astype(np.int8).view(np.uint8)      # [B, 32]
    out = np.concatenate([_f16_bytes(d), q], axis=1)             # [B, 34]
    return out.reshape(*x.shape[:-1], -1)


def quantize_q5_0(x: np.ndarray) -> np.ndarray:
    """Q5_0: `d = -m / 16` with `m` the value of largest magnitude (first one on ties), so that
    `m` maps exactly to level 0; `q = min(31, trunc(x / d + 16.5))`."""
    b = x.reshape(-1, QK)                                        # [B, 32]
    m = np.take_along_axis(b, np.abs(b).argmax(axis=1)[:, None], axis=1)
    d = m / np.float32(-16)                                      # [B, 1]
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.minimum(np.trunc(b * inv + np.float32(16.5)), 31).astype(np.uint8)   # [B, 32] in 0..31
    # byte k: value k in the low nibble, value k+16 in the high nibble; bit j of qh = bit 4 of q[j]
    qs = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)           # [B, 16]
    qh = np.packbits(q >> 4, axis=1, bitorder="little")          # [B, 4]
    out = np.concatenate([_f16_bytes(d), qh, qs], axis=1)        # [B, 22]
    return out.reshape(*x.shape[:-1], -1)


def _scale_grid(need: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Split per-sub-block scales `need` [B, S] (>= 0) into one f16 super-scale per block and integer
    sub-scales in 1..levels whose product is >= `need`, so every value stays inside the grid."""
    d = _f16_at_least(need.max(axis=1, keepdims=True) / np.float32(levels))   # [B, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.ceil(np.where(d > 0, need / d, 0))
    return d, np.clip(sc, 0, levels).astype(np.uint8)            # [B, 1], [B, S]


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Q4_K: 8 sub-blocks of 32, value = d*sc*q - dmin*m with q in 0..15 and 6-bit sc, m.

    Error bound (tested): |x - x'| <= step/2 per value, step = d*sc of its sub-block, which is at most
    (sub-block range)/15 + (largest needed step in the block)/63 plus f16 rounding."""
    b = x.reshape(-1, 8, 32)                                     # [B, S=8, 32]
    lo = np.minimum(b.min(axis=2), 0)                            # [B, S] (the min is an offset <= 0)
    dmin, m = _scale_grid(-lo, 63)                               # grid starts at -dmin*m <= lo
    base = -dmin * m                                             # [B, S]
    need = (b.max(axis=2) - base) / np.float32(15)               # step that reaches the max
    d, sc = _scale_grid(need, 63)
    step = d * sc                                                # [B, S]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step[..., None] > 0, (b - base[..., None]) / step[..., None], 0)
    q = np.clip(np.rint(q), 0, 15).astype(np.uint8)              # [B, S, 32]
    # 12 scale bytes: 6 low bits of sc/m for sub-blocks 0..3 in bytes 0..7, sub-blocks 4..7 split
    # into a low nibble (bytes 8..11) and 2 high bits parked in the top of bytes 0..7.
    s = np.empty((b.shape[0], 12), np.uint8)
    s[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    s[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    s[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    # qs: chunk c holds sub-block 2c in the low nibbles and 2c+1 in the high nibbles
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)       # [B, 4*32]
    out = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), s, qs], axis=1)   # [B, 144]
    return out.reshape(*x.shape[:-1], -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K: 16 sub-blocks of 16, value = d*sc*(q-32) with q in 0..63 and int8 sc (kept > 0 here).

    Error bound (tested): |x - x'| <= step/2, step = d*sc <= amax_sub/31 + amax_block/(31*127) plus f16
    rounding."""
    b = x.reshape(-1, 16, 16)                                    # [B, S=16, 16]
    need = np.abs(b).max(axis=2) / np.float32(31)                # [B, S]
    d, sc = _scale_grid(need, 127)
    step = d * sc
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step[..., None] > 0, b / step[..., None], 0)
    q = (np.clip(np.rint(q), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # [B, half, quarter, 32]
    # Within a half of 128 values, quarter k (values 32k..32k+31) keeps its low nibble in ql (quarters
    # 0,1 low nibbles, 2,3 high nibbles of the same 64 bytes) and its top 2 bits at bit 2k of qh.
    lo, hi = q & 15, q >> 4
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)   # [B, 2, 32]
    out = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), _f16_bytes(d)],
                         axis=1)                                 # [B, 210]
    return out.reshape(*x.shape[:-1], -1)


_QUANTIZERS = {"Q8_0": quantize_q8_0, "Q5_0": quantize_q5_0, "Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}


def can_quantize(qtype: str, row_length: int) -> bool:
    return row_length % BLOCK[qtype][0] == 0


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """`x` [..., n] -> F32/F16 as float arrays, every other type as uint8 [..., row_bytes]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == "F32":
        return x
    if qtype == "F16":
        return x.astype(np.float16)
    n = x.shape[-1]
    if not can_quantize(qtype, n):
        raise ValueError(f"{qtype} needs rows that are a multiple of {BLOCK[qtype][0]}, got {n}")
    fn = quantize_bf16 if qtype == "BF16" else _QUANTIZERS[qtype]
    rows = x.reshape(-1, n)
    per = max(1, _CHUNK_ELEMENTS // n)
    out = np.concatenate([fn(rows[i:i + per]) for i in range(0, rows.shape[0], per)], axis=0)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def dequantize(raw: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Reference read-back through `gguf.quants` (the project's oracle), for checks and tests."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize
    if qtype in ("F32", "F16"):
        return np.asarray(raw, dtype=np.float32).reshape(shape)
    out = gguf_dequantize(np.ascontiguousarray(raw).view(np.uint8), GGMLQuantizationType[qtype])
    return out.reshape(shape)
