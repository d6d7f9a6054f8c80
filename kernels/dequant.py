"""Dequantise ggml blocks on the GPU: raw uint8 blocks -> fp32/fp16/bf16 values.

Layouts are drawn in diffcli/gguf/quants.py (the torch reference each decoder here must equal). The
float arithmetic follows the same order, e.g. Q4_K is `(d*sc)*q - (dmin*m)`, so fp32 output is
bit-exact with the reference and with `gguf.quants.dequantize`.

Decoders (`_decode_<type>`), reusable by fused kernels (qmatmul, moe):

    vals = _decode_q4_k(ptr, base, mask)

- `ptr`: the uint8 tensor of blocks. `base`: int64 byte offset of the first byte of a block,
  a 3-D tensor. For the 32-value formats `base` is [R, N, 1] (R rows x N consecutive blocks, say)
  and the result is [R, N, 32]; for the 256-value K-quants `base` is [R, 1, 1] and the result is
  [R, S, L] with (S, L) = `KQ_TILE[qtype]`: S groups of L values that share one scale, in
  element order (value index = S-index * L + L-index).
- `mask`: bool, broadcastable to `base`; masked blocks read as all-zero bytes, so they decode to
  zeros (never NaN), which a matmul can add without a second mask.
- Result: fp32, bit-exact with `diffcli.quants.dequantize_torch` for every addressed block.
Only loads, integer shifts/masks, `where`, casts and bitcasts are used, all of which behave the
same on Triton 3.x GPUs and under TRITON_INTERPRET=1.

Legend: R rows of blocks per program, N blocks per row, S scale groups, L values per group.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# qtype -> (values per block, bytes per block, kernel id)
LAYOUT = {
    "Q8_0": (32, 34, 0), "Q4_0": (32, 18, 1), "Q4_1": (32, 20, 2), "Q5_0": (32, 22, 3),
    "Q5_1": (32, 24, 4), "IQ4_NL": (32, 18, 5),
    "Q2_K": (256, 84, 10), "Q3_K": (256, 110, 11), "Q4_K": (256, 144, 12), "Q5_K": (256, 176, 13),
    "Q6_K": (256, 210, 14), "IQ4_XS": (256, 136, 15),
}
KQ_TILE = {"Q2_K": (16, 16), "Q3_K": (16, 16), "Q4_K": (8, 32), "Q5_K": (8, 32),
           "Q6_K": (16, 16), "IQ4_XS": (8, 32)}
KERNEL_TYPES = frozenset(LAYOUT)
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
VALUES_PER_PROGRAM = 4096


# -- byte access ----------------------------------------------------------------------------

@triton.jit
def _u8(ptr, off, mask):
    """Bytes at `off` as int32 (0 where masked)."""
    return tl.load(ptr + off, mask=mask, other=0).to(tl.int32)


@triton.jit
def _i8(ptr, off, mask):
    return tl.load(ptr + off, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.int32)


@triton.jit
def _f16(ptr, off, mask):
    """The little-endian f16 at `off` as fp32; read bytewise, so any alignment works."""
    lo = tl.load(ptr + off, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + off + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nibble(ptr, qs, j, mask):
    """Value j (< 32) of a 16-byte run of nibbles at `qs`: byte j%16, low nibble for j < 16."""
    return (_u8(ptr, qs + (j % 16), mask) >> ((j // 16) * 4)) & 15


@triton.jit
def _bit_of_u32(ptr, at, j, mask):
    """Bit j of the little-endian u32 at `at`."""
    return (_u8(ptr, at + j // 8, mask) >> (j % 8)) & 1


@triton.jit
def _iq4_grid(q):
    """IQ4_NL_VALUES[q] for q in 0..15 (the non-linear 4-bit grid), as a balanced select tree."""
    lo = tl.where(q < 4, tl.where(q < 2, tl.where(q < 1, -127, -104), tl.where(q < 3, -83, -65)),
                  tl.where(q < 6, tl.where(q < 5, -49, -35), tl.where(q < 7, -22, -10)))
    hi = tl.where(q < 12, tl.where(q < 10, tl.where(q < 9, 1, 13), tl.where(q < 11, 25, 38)),
                  tl.where(q < 14, tl.where(q < 13, 53, 69), tl.where(q < 15, 89, 113)))
    return tl.where(q < 8, lo, hi)


@triton.jit
def _k_scale_min(ptr, s, i, mask):
    """Six-bit (scale, min) of sub-block i (0..7) from the 12 scale bytes at `s` (Q4_K, Q5_K)."""
    a = _u8(ptr, s + (i % 4), mask)          # byte i%4: scale (i<4), top bits of scale i+4
    b = _u8(ptr, s + 4 + (i % 4), mask)      # byte 4+i%4: min (i<4), top bits of min i+4
    c = _u8(ptr, s + 8 + (i % 4), mask)      # byte 8+i%4: low nibbles of scale/min i+4
    first = i < 4
    sc = tl.where(first, a & 63, (c & 15) | ((a >> 6) << 4))
    mn = tl.where(first, b & 63, (c >> 4) | ((b >> 6) << 4))
    return sc, mn


# -- 32-value formats: base [R, N, 1] -> [R, N, 32] -------------------------------------------

@triton.jit
def _decode_q8_0(ptr, base, mask):
    j = tl.arange(0, 32)[None, None, :]
    d = _f16(ptr, base, mask)
    q = _i8(ptr, base + 2 + j, mask)
    return q.to(tl.float32) * d


@triton.jit
def _decode_q4_0(ptr, base, mask):
    j = tl.arange(0, 32)[None, None, :]
    d = _f16(ptr, base, mask)
    return d * (_nibble(ptr, base + 2, j, mask) - 8).to(tl.float32)


@triton.jit
def _decode_q4_1(ptr, base, mask):
    j = tl.arange(0, 32)[None, None, :]
    d = _f16(ptr, base, mask)
    m = _f16(ptr, base + 2, mask)
    return d * _nibble(ptr, base + 4, j, mask).to(tl.float32) + m


@triton.jit
def _decode_q5_0(ptr, base, mask):
    j = tl.arange(0, 32)[None, None, :]
    d = _f16(ptr, base, mask)
    q = _nibble(ptr, base + 6, j, mask) | (_bit_of_u32(ptr, base + 2, j, mask) << 4)
    return d * (q - 16).to(tl.float32)


@triton.jit
def _decode_q5_1(ptr, base, mask):
    j = tl.arange(0, 32)[None, None, :]
    d = _f16(ptr, base, mask)
    m = _f16(ptr, base + 2, mask)
    q = _nibble(ptr, base + 8, j, mask) | (_bit_of_u32(ptr, base + 4, j, mask) << 4)
    return d * q.to(tl.float32) + m


@triton.jit
def _decode_iq4_nl(ptr, base, mask):
    j = tl.arange(0, 32)[None, None, :]
    d = _f16(ptr, base, mask)
    return d * _iq4_grid(_nibble(ptr, base + 2, j, mask)).to(tl.float32)


# -- K-quants: base [R, 1, 1] -> [R, S, L] ----------------------------------------------------

@triton.jit
def _decode_q2_k(ptr, base, mask):
    s = tl.arange(0, 16)[None, :, None]                   # [1, S, 1]  scale group
    v = s * 16 + tl.arange(0, 16)[None, None, :]          # [1, S, L]  value index
    byte = _u8(ptr, base + 16 + 32 * (v // 128) + v % 32, mask)
    q = (byte >> (2 * ((v % 128) // 32))) & 3
    sc = _u8(ptr, base + s, mask)
    dl = _f16(ptr, base + 80, mask) * (sc & 15).to(tl.float32)
    ml = _f16(ptr, base + 82, mask) * (sc >> 4).to(tl.float32)
    return dl * q.to(tl.float32) - ml


@triton.jit
def _decode_q3_k(ptr, base, mask):
    s = tl.arange(0, 16)[None, :, None]
    v = s * 16 + tl.arange(0, 16)[None, None, :]
    b = v // 32                                           # bit plane of hmask, 0..7
    low = (_u8(ptr, base + 32 + 32 * (b // 4) + v % 32, mask) >> (2 * (b % 4))) & 3
    bit = (_u8(ptr, base + v % 32, mask) >> b) & 1
    q = low - 4 * (1 - bit)
    lo = (_u8(ptr, base + 96 + s % 8, mask) >> (4 * (s // 8))) & 15
    hi = (_u8(ptr, base + 104 + s % 4, mask) >> (2 * (s // 4))) & 3
    dl = _f16(ptr, base + 108, mask) * ((lo | (hi << 4)) - 32).to(tl.float32)
    return dl * q.to(tl.float32)


@triton.jit
def _decode_q4_k(ptr, base, mask):
    i = tl.arange(0, 8)[None, :, None]                    # [1, S, 1]  sub-block
    l = tl.arange(0, 32)[None, None, :]                   # [1, 1, L]
    sc, mn = _k_scale_min(ptr, base + 4, i, mask)
    dl = _f16(ptr, base, mask) * sc.to(tl.float32)
    ml = _f16(ptr, base + 2, mask) * mn.to(tl.float32)
    q = (_u8(ptr, base + 16 + 32 * (i // 2) + l, mask) >> (4 * (i % 2))) & 15
    return dl * q.to(tl.float32) - ml


@triton.jit
def _decode_q5_k(ptr, base, mask):
    i = tl.arange(0, 8)[None, :, None]
    l = tl.arange(0, 32)[None, None, :]
    sc, mn = _k_scale_min(ptr, base + 4, i, mask)
    dl = _f16(ptr, base, mask) * sc.to(tl.float32)
    ml = _f16(ptr, base + 2, mask) * mn.to(tl.float32)
    low = (_u8(ptr, base + 48 + 32 * (i // 2) + l, mask) >> (4 * (i % 2))) & 15
    high = (_u8(ptr, base + 16 + l, mask) >> i) & 1
    return dl * (low | (high << 4)).to(tl.float32) - ml


@triton.jit
def _decode_q6_k(ptr, base, mask):
    s = tl.arange(0, 16)[None, :, None]
    v = s * 16 + tl.arange(0, 16)[None, None, :]
    h = v // 128                                          # half
    r = (v % 128) // 32                                   # quarter within the half
    l = v % 32
    low = (_u8(ptr, base + 64 * h + 32 * (r % 2) + l, mask) >> (4 * (r // 2))) & 15
    high = (_u8(ptr, base + 128 + 32 * h + l, mask) >> (2 * r)) & 3
    dl = _f16(ptr, base + 208, mask) * _i8(ptr, base + 192 + s, mask).to(tl.float32)
    return dl * ((low | (high << 4)) - 32).to(tl.float32)


@triton.jit
def _decode_iq4_xs(ptr, base, mask):
    i = tl.arange(0, 8)[None, :, None]
    l = tl.arange(0, 32)[None, None, :]
    lo = (_u8(ptr, base + 4 + i // 2, mask) >> (4 * (i % 2))) & 15
    hi = (_u8(ptr, base + 2 + i // 4, mask) >> (2 * (i % 4))) & 3
    dl = _f16(ptr, base, mask) * ((lo | (hi << 4)) - 32).to(tl.float32)
    q = _nibble(ptr, base + 8 + 16 * i, l, mask)
    return dl * _iq4_grid(q).to(tl.float32)


@triton.jit
def decode_blocks(ptr, base, mask, QT: tl.constexpr):
    """Decode the blocks at `base` with the decoder for kernel id QT (`LAYOUT[qtype][2]`)."""
    if QT == 0:
        vals = _decode_q8_0(ptr, base, mask)
    elif QT == 1:
        vals = _decode_q4_0(ptr, base, mask)
    elif QT == 2:
        vals = _decode_q4_1(ptr, base, mask)
    elif QT == 3:
        vals = _decode_q5_0(ptr, base, mask)
    elif QT == 4:
        vals = _decode_q5_1(ptr, base, mask)
    elif QT == 5:
        vals = _decode_iq4_nl(ptr, base, mask)
    elif QT == 10:
        vals = _decode_q2_k(ptr, base, mask)
    elif QT == 11:
        vals = _decode_q3_k(ptr, base, mask)
    elif QT == 12:
        vals = _decode_q4_k(ptr, base, mask)
    elif QT == 13:
        vals = _decode_q5_k(ptr, base, mask)
    elif QT == 14:
        vals = _decode_q6_k(ptr, base, mask)
    else:
        vals = _decode_iq4_xs(ptr, base, mask)
    return vals


@triton.jit
def _dequant_kernel(raw_ptr, out_ptr, n_blocks, TYPE_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCKS: tl.constexpr, QT: tl.constexpr):
    """out[b*BLOCK_SIZE + k] = value k of block b, for BLOCKS blocks per program.

    Rows do not matter here: a row is a whole number of blocks, so the tensor is one run of
    blocks. The kernel is specialised per type through the constexpr QT."""
    blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)   # [R]
    ok = blk < n_blocks
    vals = decode_blocks(raw_ptr, (blk * TYPE_SIZE)[:, None, None], ok[:, None, None], QT)
    vals = tl.reshape(vals, (BLOCKS, BLOCK_SIZE))                        # [R, values per block]
    k = tl.arange(0, BLOCK_SIZE)
    tl.store(out_ptr + blk[:, None] * BLOCK_SIZE + k[None, :],
             vals.to(out_ptr.dtype.element_ty), mask=ok[:, None])


def dequantize_triton(raw: torch.Tensor, qtype: str, numel: int,
                      out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 blocks (contiguous, 1-D or [rows, row_bytes]) -> 1-D `out_dtype` tensor of `numel`.

    Float types need no kernel: they are reinterpreted and cast."""
    assert raw.dtype == torch.uint8, f"raw blocks must be uint8, got {raw.dtype}"
    assert raw.is_contiguous(), "raw blocks must be contiguous"
    assert out_dtype in OUT_DTYPES, f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}"
    raw = raw.reshape(-1)
    if qtype in FLOAT_TYPES:
        if raw.storage_offset() % 4:   # a dtype view needs aligned storage
            raw = raw.clone()
        vals = raw.view(FLOAT_TYPES[qtype])
        assert vals.numel() == numel, f"{qtype}: {raw.numel()} bytes for {numel} values"
        return vals.to(out_dtype)
    assert qtype in LAYOUT, f"no Triton dequantiser for {qtype}"
    per, tsize, qt = LAYOUT[qtype]
    assert numel % per == 0, f"{qtype}: {numel} values is not a whole number of {per}-blocks"
    n_blocks = numel // per
    assert raw.numel() == n_blocks * tsize, \
        f"{qtype}: {raw.numel()} bytes, expected {n_blocks} blocks x {tsize}"
    out = torch.empty(numel, dtype=out_dtype, device=raw.device)
    if n_blocks == 0:
        return out
    blocks = VALUES_PER_PROGRAM // per
    grid = (triton.cdiv(n_blocks, blocks),)
    _dequant_kernel[grid](raw, out, n_blocks, TYPE_SIZE=tsize, BLOCK_SIZE=per, BLOCKS=blocks, QT=qt)
    return out
