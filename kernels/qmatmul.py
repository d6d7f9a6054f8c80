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

from .dequant import _f16, _u8   # byte and unaligned-f16 loads shared with the dequantizers

# qtype -> (values per ggml block, bytes per ggml block, BK values per K-tile)
# A K-tile is decoded as two halves of BK/2 values, "a" and "b", where b's value k sits at a's
# k + HALF: the two nibbles of one byte (Q4_K, Q5_0, Q6_K) land in different halves, so each byte
# is loaded once, and both halves are fed to tl.dot against the matching columns of x.
LAYOUT = {
    "Q8_0": (32, 34, 128),
    "Q5_0": (32, 22, 128),
    "Q4_K": (256, 144, 256),
    "Q6_K": (256, 210, 256),
}
QTYPE_ID = {"Q8_0": 0, "Q5_0": 1, "Q4_K": 2, "Q6_K": 3}
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SUPPORTED = frozenset(LAYOUT) | frozenset(FLOAT_TYPES)


@triton.jit
def _decode_q8_0(w_ptr, row_off, blk0, nblk, rmask):
    # block: f16 d | 32 x int8 q.  a: values 0..15 of each block, b: 16..31.  [BN, 4, 16] each
    b = tl.arange(0, 4)[None, :, None]                     # [1, 4, 1] block in the K-tile
    j = tl.arange(0, 16)[None, None, :]                    # [1, 1, 16]
    m = rmask & ((blk0 + b) < nblk)                          # [BN, 4, 1]
    base = row_off + (blk0 + b).to(tl.int64) * 34
    d = _f16(w_ptr, base, m)
    qa = tl.load(w_ptr + base + 2 + j, mask=m, other=0).to(tl.int8, bitcast=True)
    qb = tl.load(w_ptr + base + 18 + j, mask=m, other=0).to(tl.int8, bitcast=True)
    return d * qa.to(tl.float32), d * qb.to(tl.float32)


@triton.jit
def _decode_q5_0(w_ptr, row_off, blk0, nblk, rmask):
    # block: f16 d | u32 qh (bit j = 5th bit of value j) | 16 bytes qs (value j low nibble,
    # value j+16 high nibble).  a: values 0..15, b: 16..31.  [BN, 4, 16] each
    b = tl.arange(0, 4)[None, :, None]
    j = tl.arange(0, 16)[None, None, :]
    m = rmask & ((blk0 + b) < nblk)
    base = row_off + (blk0 + b).to(tl.int64) * 22
    d = _f16(w_ptr, base, m)
    qh = _u8(w_ptr, base + 2, m) | (_u8(w_ptr, base + 3, m) << 8) \
        | (_u8(w_ptr, base + 4, m) << 16) | (_u8(w_ptr, base + 5, m) << 24)
    byte = _u8(w_ptr, base + 6 + j, m)                     # [BN, 4, 16]
    qa = (byte & 15) | (((qh >> j) & 1) << 4)
    qb = (byte >> 4) | (((qh >> (j + 16)) & 1) << 4)
    return d * (qa - 16).to(tl.float32), d * (qb - 16).to(tl.float32)


@triton.jit
def _q4_k_scale_min(w_ptr, base, i, rmask):
    # 12 bytes s at base+4 pack eight 6-bit (scale, min) pairs; for sub-block i:
    #   i < 4:  sc = s[i] & 63                            m = s[i+4] & 63
    #   i >= 4: sc = (s[i+4] & 15) | (s[i-4] >> 6) << 4  m = (s[i+4] >> 4) | (s[i] >> 6) << 4
    a = _u8(w_ptr, base + 4 + i, rmask)                    # s[i]
    b = _u8(w_ptr, base + 8 + i, rmask)                    # s[i+4]
    c = _u8(w_ptr, base + 4 + (i + 4) % 8, rmask)          # s[i-4] where i >= 4
    lo = i < 4
    sc = tl.where(lo, a & 63, (b & 15) | ((c >> 6) << 4))
    mn = tl.where(lo, b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _decode_q4_k(w_ptr, row_off, blk, rmask):
    # super-block: f16 d | f16 dmin | 12 bytes scales/mins | 128 bytes qs in four 32-byte chunks;
    # chunk c holds sub-block 2c (values 64c..64c+31) in its low nibbles and 2c+1 (the next 32) in
    # its high nibbles.  a: the low nibbles, b: the high.  [BN, 4, 32] each
    c = tl.arange(0, 4)[None, :, None]                     # [1, 4, 1]
    j = tl.arange(0, 32)[None, None, :]                    # [1, 1, 32]
    base = row_off + blk * 144                             # [BN, 1, 1]
    d = _f16(w_ptr, base, rmask)
    dmin = _f16(w_ptr, base + 2, rmask)
    sc_a, mn_a = _q4_k_scale_min(w_ptr, base, 2 * c, rmask)
    sc_b, mn_b = _q4_k_scale_min(w_ptr, base, 2 * c + 1, rmask)
    byte = _u8(w_ptr, base + 16 + c * 32 + j, rmask)       # [BN, 4, 32]
    wa = (d * sc_a) * (byte & 15).to(tl.float32) - dmin * mn_a
    wb = (d * sc_b) * (byte >> 4).to(tl.float32) - dmin * mn_b
    return wa, wb


@triton.jit
def _decode_q6_k(w_ptr, row_off, blk, rmask):
    # super-block: 128 bytes ql | 64 bytes qh | 16 x int8 scales | f16 d. Value v = 128h + 32r + l
    # takes its low 4 bits from ql[64h + l + 32(r%2)] (low nibble for r < 2, high for r >= 2) and
    # its top 2 bits from qh[32h + l] >> 2r; one int8 scale per 16 values; value = d*scale*(q-32).
    # a: r in {0, 1} (values 128h + m, m < 64), b: r in {2, 3} (a + 64).  [BN, 8, 16] each, group
    # g = 4h + m // 16
    g = tl.arange(0, 8)[None, :, None]                     # [1, 8, 1]
    t = tl.arange(0, 16)[None, None, :]                    # [1, 1, 16]
    h = g // 4
    mm = (g % 4) * 16 + t                                  # m in 0..63
    base = row_off + blk * 210
    ql = _u8(w_ptr, base + 64 * h + mm, rmask)             # [BN, 8, 16]
    qh = _u8(w_ptr, base + 128 + 32 * h + mm % 32, rmask) >> (2 * (mm // 32))
    qa = (ql & 15) | ((qh & 3) << 4)
    qb = (ql >> 4) | (((qh >> 4) & 3) << 4)
    sa = tl.load(w_ptr + base + 192 + 8 * h + g % 4, mask=rmask, other=0).to(tl.int8, bitcast=True)
    sb = tl.load(w_ptr + base + 196 + 8 * h + g % 4, mask=rmask, other=0).to(tl.int8, bitcast=True)
    d = _f16(w_ptr, base + 208, rmask)
    return (d * sa.to(tl.float32)) * (qa - 32).to(tl.float32), \
        (d * sb.to(tl.float32)) * (qb - 32).to(tl.float32)


@triton.jit
def decode_tile(w_ptr, row_off, kt, nblk, rmask, QT: tl.constexpr, BN: tl.constexpr,
                HB: tl.constexpr):
    """K-tile `kt` of the rows at byte offsets `row_off` [BN,1,1] as two fp32 [BN, HB] halves
    (see LAYOUT; `x_index` gives their columns). `nblk` = ggml blocks per row masks the K tail."""
    if QT == 0:
        wa, wb = _decode_q8_0(w_ptr, row_off, kt * 4, nblk, rmask)
    elif QT == 1:
        wa, wb = _decode_q5_0(w_ptr, row_off, kt * 4, nblk, rmask)
    elif QT == 2:
        wa, wb = _decode_q4_k(w_ptr, row_off, kt, rmask)
    else:
        wa, wb = _decode_q6_k(w_ptr, row_off, kt, rmask)
    return tl.reshape(wa, (BN, HB)), tl.reshape(wb, (BN, HB))


@triton.jit
def x_index(QT: tl.constexpr, HB: tl.constexpr):
    """Columns (within the K-tile) of half a; half b is these + HALF."""
    a = tl.arange(0, HB)
    if QT == 2:
        return (a // 32) * 64 + a % 32
    elif QT == 3:
        return (a // 64) * 128 + a % 64
    else:
        return (a // 16) * 32 + a % 16


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
                    QT: tl.constexpr, BK: tl.constexpr, HALF: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, DOT_F32: tl.constexpr):
    HB: tl.constexpr = BK // 2
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)                   # [BM] token rows
    cols = pid_n * BN + tl.arange(0, BN)                   # [BN] weight rows = output columns
    ka = x_index(QT, HB)                                   # [HB]
    row_off = (cols.to(tl.int64) * row_bytes)[:, None, None]
    rmask = (cols < N)[:, None, None]
    xrow = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kt in range(0, n_ktiles):
        k = kt * BK + ka
        xm = (rows[:, None] < T) & (k[None, :] < K)
        xa = tl.load(xrow + k[None, :], mask=xm, other=0.0)              # [BM, HB]
        xb = tl.load(xrow + (k + HALF)[None, :], mask=xm, other=0.0)
        wa, wb = decode_tile(w_ptr, row_off, kt, nblk, rmask, QT, BN, HB)  # [BN, HB] each
        acc = _dot_acc(acc, xa, wa, DOT_F32)
        acc = _dot_acc(acc, xb, wb, DOT_F32)
    ymask = (rows[:, None] < T) & (cols[None, :] < N)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=ymask)


HALF = {"Q8_0": 16, "Q5_0": 16, "Q4_K": 32, "Q6_K": 64}


def dot_f32(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tile_config(T: int) -> tuple[int, int, int]:
    """(BM, BN, num_warps) for T rows. Decoding the weight tile costs more than the dot and every
    M-tile decodes it again, so a canvas (256) gets BM=128 (two decodes per weight); BN=32 with
    8 warps keeps sm_90 registers under ~140 (ptxas, no spills). H100, one canvas step: 12.0 ms
    of qmatmul with this vs 13.0 ms with (64, 64, 4) and the first decoder. Prefill keeps
    (64, 64, 4): the whole-model 4096-token prefill ran at 742 tokens/s with it (first decoder)
    and 494 with the canvas config (current decoder). Re-tune with `scripts/bench.py --sweep`."""
    if T <= 16:
        return 16, 32, 4
    if T <= 32:
        return 32, 32, 4
    if T <= 64:
        return 64, 32, 8
    if T <= 256:
        return 128, 32, 8
    return 64, 64, 4


def check_blocks(raw: torch.Tensor, qtype: str, rows: int, K: int) -> int:
    """Bytes per row of a [rows, K] tensor stored as `qtype`, after checking `raw` matches."""
    per, bsize, _ = LAYOUT[qtype]
    assert K % per == 0, f"{qtype}: in-features {K} not a multiple of {per}"
    row_bytes = K // per * bsize
    assert raw.dtype == torch.uint8 and raw.dim() == 1 and raw.is_contiguous(), \
        "raw blocks must be a contiguous 1-D uint8 tensor"
    assert raw.numel() == rows * row_bytes, \
        f"{qtype}: {raw.numel()} bytes, expected {rows} rows x {row_bytes}"
    return row_bytes


def qmatmul(x: torch.Tensor, qt, block_m: int | None = None, block_n: int | None = None,
            num_warps: int | None = None, num_stages: int = 2) -> torch.Tensor:
    """x [T, K] (bf16/fp16/fp32) @ W[N, K].T -> [T, N] in x.dtype, accumulated in fp32.

    `qt` is a 2-D QTensor-like object (`raw` uint8 blocks, `qtype`, `shape` = (N, K)).
    Tile arguments override `tile_config` (for benchmarks)."""
    assert x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16, torch.float32), \
        f"x must be 2-D bf16/fp16/fp32, got {tuple(x.shape)} {x.dtype}"
    assert len(qt.shape) == 2 and qt.shape[1] == x.shape[1], \
        f"weight {tuple(qt.shape)} does not match x {tuple(x.shape)}"
    assert qt.raw.device == x.device, "x and the weight must be on one device"
    N, K = qt.shape
    if qt.qtype in FLOAT_TYPES:
        raw = qt.raw.clone() if qt.raw.storage_offset() % 4 else qt.raw   # dtype views need alignment
        w = raw.view(FLOAT_TYPES[qt.qtype]).view(N, K)
        return (x.float() @ w.float().t()).to(x.dtype) if x.dtype != w.dtype else x @ w.t()
    if qt.qtype not in LAYOUT:
        # formats without a fused decoder (Q4_0, Q2_K, IQ4_NL, ...): Triton dequantize, then matmul
        from .dequant import dequantize_triton
        return x @ dequantize_triton(qt.raw, qt.qtype, N * K, x.dtype).view(N, K).t()
    per, _, bk = LAYOUT[qt.qtype]
    row_bytes = check_blocks(qt.raw, qt.qtype, N, K)
    x = x.contiguous()
    T = x.shape[0]
    y = torch.empty((T, N), dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    bm, bn, nw = tile_config(T)
    bm, bn, nw = block_m or bm, block_n or bn, num_warps or nw
    grid = (triton.cdiv(T, bm), triton.cdiv(N, bn))
    _qmatmul_kernel[grid](x, qt.raw, y, T, N, K, x.stride(0), y.stride(0), row_bytes, K // per,
                          triton.cdiv(K, bk), QT=QTYPE_ID[qt.qtype], BK=bk, HALF=HALF[qt.qtype],
                          BM=bm, BN=bn, DOT_F32=dot_f32(x), num_warps=nw, num_stages=num_stages)
    return y
