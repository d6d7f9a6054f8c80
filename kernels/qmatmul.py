"""Fused dequantize + matmul: y[T, N] = x[T, K] @ W[N, K].T with W kept as raw ggml blocks.

Legend: T tokens (rows of x; 256 for a canvas), K in-features, N out-features, BM/BN/BK the tile
sizes, NSUB x SUB the block structure of one K-tile (sub-blocks that share a scale).

Each program owns a [BM, BN] output tile. Per K-step it loads a [BN, BK] tile of quantized bytes,
decodes it in registers to the dot dtype (bf16/fp16, or fp32 for fp32 inputs) and feeds `tl.dot`
with fp32 accumulation. The decoded weight never touches device memory, so one pass over the
weights costs only their quantized bytes (0.56 B/weight for Q4_K instead of 2 for bf16).

The decoders (`_decode_*`) follow spec §A.6 and take a tile of rows (`row_off`, byte offset of each
row's first byte, [BN, 1, 1]) and the index of the first ggml block of the K-tile; moe.py reuses
them. Only long-standing `tl` ops are used (loads, shifts, where, reshape, trans, dot, sigmoid) so
the same code runs on Triton 3.6 (GPU) and under TRITON_INTERPRET=1 on CPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# qtype -> (values per ggml block, bytes per ggml block, NSUB, SUB): a K-tile is [NSUB, SUB].
# For the 32-value formats the K-tile spans NSUB whole blocks; for the K-quants it is one
# 256-value super-block split into its scale groups.
LAYOUT = {
    "Q8_0": (32, 34, 4, 32),
    "Q5_0": (32, 22, 4, 32),
    "Q4_K": (256, 144, 8, 32),
    "Q6_K": (256, 210, 16, 16),
}
QTYPE_ID = {"Q8_0": 0, "Q5_0": 1, "Q4_K": 2, "Q6_K": 3}
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SUPPORTED = frozenset(LAYOUT) | frozenset(FLOAT_TYPES)


@triton.jit
def _u8(ptr, off, mask):
    return tl.load(ptr + off, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(ptr, off, mask):
    # an unaligned little-endian f16 read as two bytes, then reinterpreted
    lo = tl.load(ptr + off, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + off + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _decode_q8_0(w_ptr, row_off, blk0, nblk, rmask, NSUB: tl.constexpr):
    # block: f16 d | 32 x int8 q
    b = tl.arange(0, NSUB)[None, :, None]                  # [1, NSUB, 1]
    j = tl.arange(0, 32)[None, None, :]                    # [1, 1, 32]
    m = rmask & ((blk0 + b) < nblk)                          # [BN, NSUB, 1]
    base = row_off + (blk0 + b).to(tl.int64) * 34
    d = _f16(w_ptr, base, m)                               # [BN, NSUB, 1]
    q = tl.load(w_ptr + base + 2 + j, mask=m, other=0).to(tl.int8, bitcast=True)
    return d * q.to(tl.float32)                            # [BN, NSUB, 32]


@triton.jit
def _decode_q5_0(w_ptr, row_off, blk0, nblk, rmask, NSUB: tl.constexpr):
    # block: f16 d | u32 qh (bit j = 5th bit of value j) | 16 bytes qs (value k low, k+16 high)
    b = tl.arange(0, NSUB)[None, :, None]
    j = tl.arange(0, 32)[None, None, :]
    m = rmask & ((blk0 + b) < nblk)
    base = row_off + (blk0 + b).to(tl.int64) * 22
    d = _f16(w_ptr, base, m)
    qh = _u8(w_ptr, base + 2, m) | (_u8(w_ptr, base + 3, m) << 8) \
        | (_u8(w_ptr, base + 4, m) << 16) | (_u8(w_ptr, base + 5, m) << 24)
    byte = _u8(w_ptr, base + 6 + (j % 16), m)               # [BN, NSUB, 32]
    nib = (byte >> ((j // 16) * 4)) & 15
    q = nib | (((qh >> j) & 1) << 4)
    return d * (q - 16).to(tl.float32)


@triton.jit
def _decode_q4_k(w_ptr, row_off, blk, rmask):
    # super-block: f16 d | f16 dmin | 12 bytes of 6-bit scales/mins | 128 bytes qs
    #   scales s[0..11], sub-block i in 0..7:
    #     i < 4:  sc = s[i] & 63                        m = s[i+4] & 63
    #     i >= 4: sc = (s[i+4] & 15) | (s[i-4] >> 6) << 4   m = (s[i+4] >> 4) | (s[i] >> 6) << 4
    #   qs: four 32-byte chunks; chunk c -> sub-block 2c (low nibbles), 2c+1 (high nibbles)
    i = tl.arange(0, 8)[None, :, None]                     # [1, 8, 1]
    j = tl.arange(0, 32)[None, None, :]                    # [1, 1, 32]
    base = row_off + blk * 144                # [BN, 1, 1]
    d = _f16(w_ptr, base, rmask)
    dmin = _f16(w_ptr, base + 2, rmask)
    a = _u8(w_ptr, base + 4 + i, rmask)                    # s[i]
    b = _u8(w_ptr, base + 8 + i, rmask)                    # s[i+4]
    c = _u8(w_ptr, base + 4 + (i + 4) % 8, rmask)          # s[i-4] where i >= 4
    lo = i < 4
    sc = tl.where(lo, a & 63, (b & 15) | ((c >> 6) << 4))
    mn = tl.where(lo, b & 63, (b >> 4) | ((a >> 6) << 4))
    byte = _u8(w_ptr, base + 16 + (i // 2) * 32 + j, rmask)  # [BN, 8, 32]
    q = (byte >> ((i % 2) * 4)) & 15
    return (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * mn.to(tl.float32)


@triton.jit
def _decode_q6_k(w_ptr, row_off, blk, rmask):
    # super-block: 128 bytes ql | 64 bytes qh | 16 x int8 scales | f16 d
    #   value v = 128h + 32r + l (h half, r quarter, l in 0..31):
    #     low 4 bits: ql[64h + l + 32(r%2)] >> 4(r//2);  high 2 bits: qh[32h + l] >> 2r
    #   one int8 scale per run of 16 values; value = d * scale * (q - 32)
    s = tl.arange(0, 16)[None, :, None]                    # [1, 16, 1]
    t = tl.arange(0, 16)[None, None, :]                    # [1, 1, 16]
    v = s * 16 + t                                         # [1, 16, 16] value index
    h = v // 128
    r = (v % 128) // 32
    l = v % 32
    base = row_off + blk * 210
    ql = _u8(w_ptr, base + 64 * h + l + 32 * (r % 2), rmask)
    qh = _u8(w_ptr, base + 128 + 32 * h + l, rmask)
    q = ((ql >> ((r // 2) * 4)) & 15) | (((qh >> (2 * r)) & 3) << 4)
    scale = tl.load(w_ptr + base + 192 + s, mask=rmask, other=0).to(tl.int8, bitcast=True)
    d = _f16(w_ptr, base + 208, rmask)
    return (d * scale.to(tl.float32)) * (q - 32).to(tl.float32)


@triton.jit
def decode_tile(w_ptr, row_off, kt, nblk, rmask,
                QT: tl.constexpr, NSUB: tl.constexpr, SUB: tl.constexpr, BN: tl.constexpr):
    """K-tile number `kt` of the rows at byte offsets `row_off` [BN,1,1], as fp32 [BN, NSUB*SUB].

    `nblk` is the number of ggml blocks per row (masks the K tail for the 32-value formats)."""
    if QT == 0:
        w = _decode_q8_0(w_ptr, row_off, kt * NSUB, nblk, rmask, NSUB)
    elif QT == 1:
        w = _decode_q5_0(w_ptr, row_off, kt * NSUB, nblk, rmask, NSUB)
    elif QT == 2:
        w = _decode_q4_k(w_ptr, row_off, kt, rmask)
    else:
        w = _decode_q6_k(w_ptr, row_off, kt, rmask)
    return tl.reshape(w, (BN, NSUB * SUB))


@triton.jit
def _dot_acc(acc, xt, w, DOT_F32: tl.constexpr):
    """acc += xt @ w.T with w rounded to xt's dtype first (bf16/fp16 operands, fp32 sums).

    DOT_F32 runs the product in exact fp32: for fp32 inputs, and under the interpreter, whose
    bf16 dot is broken (Triton 3.9); the operands are rounded the same way before it."""
    w = w.to(xt.dtype)
    if DOT_F32:
        acc += tl.dot(xt.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    else:
        acc += tl.dot(xt, tl.trans(w))
    return acc


@triton.jit
def _qmatmul_kernel(x_ptr, w_ptr, y_ptr, T, N, K, stride_x, stride_y, row_bytes, nblk, n_ktiles,
                    QT: tl.constexpr, NSUB: tl.constexpr, SUB: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, DOT_F32: tl.constexpr):
    BK: tl.constexpr = NSUB * SUB
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)                   # [BM] token rows
    cols = pid_n * BN + tl.arange(0, BN)                   # [BN] weight rows = output columns
    kk = tl.arange(0, BK)
    row_off = (cols.to(tl.int64) * row_bytes)[:, None, None]
    rmask = (cols < N)[:, None, None]
    xrow = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kt in range(0, n_ktiles):
        k = kt * BK + kk
        xt = tl.load(xrow + k[None, :], mask=(rows[:, None] < T) & (k[None, :] < K), other=0.0)
        w = decode_tile(w_ptr, row_off, kt, nblk, rmask, QT, NSUB, SUB, BN)   # [BN, BK]
        acc = _dot_acc(acc, xt, w, DOT_F32)
    ymask = (rows[:, None] < T) & (cols[None, :] < N)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=ymask)


def dot_f32(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tile_m(T: int) -> int:
    """Rows per program: tl.dot needs >= 16; a canvas (256) gets 64 so several programs share N."""
    return 16 if T <= 16 else 32 if T <= 32 else 64


def check_blocks(raw: torch.Tensor, qtype: str, rows: int, K: int) -> int:
    """Bytes per row of a [rows, K] tensor stored as `qtype`, after checking `raw` matches."""
    per, bsize, _, _ = LAYOUT[qtype]
    assert K % per == 0, f"{qtype}: in-features {K} not a multiple of {per}"
    row_bytes = K // per * bsize
    assert raw.dtype == torch.uint8 and raw.dim() == 1 and raw.is_contiguous(), \
        "raw blocks must be a contiguous 1-D uint8 tensor"
    assert raw.numel() == rows * row_bytes, \
        f"{qtype}: {raw.numel()} bytes, expected {rows} rows x {row_bytes}"
    return row_bytes


def qmatmul(x: torch.Tensor, qt, block_n: int = 64, num_warps: int = 4, num_stages: int = 2
            ) -> torch.Tensor:
    """x [T, K] (bf16/fp16/fp32) @ W[N, K].T -> [T, N] in x.dtype, accumulated in fp32.

    `qt` is a 2-D QTensor-like object (`raw` uint8 blocks, `qtype`, `shape` = (N, K))."""
    assert x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16, torch.float32), \
        f"x must be 2-D bf16/fp16/fp32, got {tuple(x.shape)} {x.dtype}"
    assert len(qt.shape) == 2 and qt.shape[1] == x.shape[1], \
        f"weight {tuple(qt.shape)} does not match x {tuple(x.shape)}"
    assert qt.raw.device == x.device, "x and the weight must be on one device"
    N, K = qt.shape
    if qt.qtype in FLOAT_TYPES:
        w = qt.raw.view(FLOAT_TYPES[qt.qtype]).view(N, K)
        return (x.float() @ w.float().t()).to(x.dtype) if x.dtype != w.dtype else x @ w.t()
    if qt.qtype not in LAYOUT:
        # formats without a fused decoder (Q4_0, Q2_K, IQ4_NL, ...): Triton dequantize, then matmul
        from .dequant import dequantize_triton
        return x @ dequantize_triton(qt.raw, qt.qtype, N * K, x.dtype).view(N, K).t()
    per, _, nsub, sub = LAYOUT[qt.qtype]
    row_bytes = check_blocks(qt.raw, qt.qtype, N, K)
    x = x.contiguous()
    T = x.shape[0]
    y = torch.empty((T, N), dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    bk = nsub * sub
    bm = tile_m(T)
    grid = (triton.cdiv(T, bm), triton.cdiv(N, block_n))
    _qmatmul_kernel[grid](x, qt.raw, y, T, N, K, x.stride(0), y.stride(0), row_bytes, K // per,
                          triton.cdiv(K, bk), QT=QTYPE_ID[qt.qtype], NSUB=nsub, SUB=sub,
                          BM=bm, BN=block_n, DOT_F32=dot_f32(x), num_warps=num_warps, num_stages=num_stages)
    return y
