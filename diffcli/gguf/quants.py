"""The ggml block formats diffcli reads, and a torch reference dequantiser for each.

Every quantised tensor is a run of fixed-size blocks; a row (`ne[0]` values) is a whole number of
blocks, so a tensor is just `[n_blocks, type_size]` bytes. `FORMATS` is the table: values per
block, bytes per block, and the function that turns `[B, type_size]` uint8 into `[B, block_size]`
float32. Each function's comment draws the block; multi-byte fields are little endian, `f16` is
IEEE half.

The references do their float arithmetic in the same order as `gguf.quants` (e.g. Q4_K is
`(d*sc)*q - (dmin*m)`, not `d*(sc*q) - ...`), so they are bit-exact with `gguf.quants.dequantize`
(tests/test_quants.py). Integer work (nibbles, bit planes, the -16/-32 offsets) is exact in any
order. Only portable torch ops are used, so the references run on cpu, cuda and mps alike.

Legend: B blocks, S sub-blocks (groups sharing one scale), L values per sub-block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import InputError

QK_K = 256                    # values per K-quant super-block
_CHUNK_BLOCKS = 1 << 15       # bounds the temporaries of one dequantize_torch call

Dequant = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class QuantFormat:
    name: str
    block_size: int       # values per block
    type_size: int        # bytes per block
    dequant: Dequant      # uint8 [B, type_size] -> float32 [B, block_size]


# -- byte helpers ---------------------------------------------------------------------------

def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The f16 field at byte `at` of every block, as float32 [B, 1]."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _shifts(*values: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=like.device)


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Split bytes into nibbles, low nibbles of a `group`-byte run first, then its high nibbles.

    qs [B, n] -> [B, 2n], element order (run, low/high, byte in run)."""
    B = qs.shape[0]
    q = qs.reshape(B, -1, 1, group) >> _shifts(0, 4, like=qs).view(1, 1, 2, 1)
    return (q & 0x0F).reshape(B, -1)


def _bits(qh: torch.Tensor, width: int) -> torch.Tensor:
    """Unpack `width`-bit fields from a run of bytes, bit-plane major.

    qh [B, n] -> [B, (8/width)*n]; element (plane p, byte l) = (qh[l] >> width*p) & mask."""
    B = qh.shape[0]
    planes = 8 // width
    shift = torch.arange(0, 8, width, dtype=torch.uint8, device=qh.device).view(1, planes, 1)
    return ((qh.reshape(B, 1, -1) >> shift) & ((1 << width) - 1)).reshape(B, -1)


def _bits_of_u32(qh: torch.Tensor) -> torch.Tensor:
    """A little-endian u32 [B, 4 bytes] -> its 32 bits [B, 32], bit j at column j."""
    B = qh.shape[0]
    shift = torch.arange(8, dtype=torch.uint8, device=qh.device).view(1, 1, 8)
    return ((qh.reshape(B, 4, 1) >> shift) & 1).reshape(B, 32)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K super-block from its 12 bytes.

        byte  0..3:  mmSSSSSS   sub-blocks 0..3: low 6 bits = scale, top 2 = scale 4..7 bits 4-5
        byte  4..7:  mmMMMMMM   sub-blocks 0..3: low 6 bits = min,   top 2 = min   4..7 bits 4-5
        byte  8..11: MMMMSSSS   sub-blocks 4..7: low nibble = scale bits 0-3, high = min bits 0-3
    s [B, 12] -> (scale [B, 8], min [B, 8]) as uint8."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


# -- float types ----------------------------------------------------------------------------

def _f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32)


def _f16_plain(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float16).float()


def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    # bf16 is the upper half of an f32: widen the bits rather than trust a float conversion
    wide = blocks.contiguous().view(torch.int16).to(torch.int32) << 16
    return wide.view(torch.float32)


# -- 32-value formats -----------------------------------------------------------------------

def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # | f16 d | int8 q[32] |                                 value = q * d
    d = _f16(blocks, 0)                                          # [B, 1]
    q = blocks[:, 2:34].view(torch.int8).float()                 # [B, 32]
    return q * d


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # | f16 d | qs[16] |   byte k: value k (low nibble), value k+16 (high nibble)
    #                                                          value = d * (nibble - 8)
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:18], 16).float() - 8                # [B, 32]
    return d * q


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # | f16 d | f16 m | qs[16] |   nibbles as Q4_0             value = d * nibble + m
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 4:20], 16).float()
    return d * q + m


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    # | f16 d | u32 qh | qs[16] |   bit j of qh = 5th bit of value j, nibbles as Q4_0
    #                                                          value = d * ((nibble | bit << 4) - 16)
    d = _f16(blocks, 0)
    hi = _bits_of_u32(blocks[:, 2:6])                            # [B, 32]
    q = (_nibbles(blocks[:, 6:22], 16) | (hi << 4)).float() - 16
    return d * q


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    # | f16 d | f16 m | u32 qh | qs[16] |   bits as Q5_0       value = d * (nibble | bit << 4) + m
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    hi = _bits_of_u32(blocks[:, 4:8])
    q = (_nibbles(blocks[:, 8:24], 16) | (hi << 4)).float()
    return d * q + m


IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _iq4_lookup(idx: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=idx.device)
    return table[idx.long()]


def _iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    # | f16 d | qs[16] |   nibbles as Q4_0, each an index into the non-linear grid IQ4_NL_VALUES
    #                                                          value = d * grid[nibble]
    d = _f16(blocks, 0)
    return d * _iq4_lookup(_nibbles(blocks[:, 2:18], 16))


# -- 256-value K-quants ---------------------------------------------------------------------

def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # | scales[16] | qs[64] | f16 d | f16 dmin |
    #   scales[s]: low nibble = scale, high nibble = min of values 16s..16s+15
    #   value v = 128h + 32p + l (half h, plane p, l < 32): 2 bits at qs[32h + l] >> 2p
    #                                                          value = (d*scale) * q - (dmin*min)
    B = blocks.shape[0]
    sc = blocks[:, 0:16]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    dl = (d * (sc & 0x0F).float()).view(B, 16, 1)                # [B, S, 1]
    ml = (dmin * (sc >> 4).float()).view(B, 16, 1)
    q = _bits(blocks[:, 16:80].reshape(B * 2, 32), 2).reshape(B, 16, 16).float()   # [B, S, L]
    return (dl * q - ml).reshape(B, QK_K)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # | hmask[32] | qs[64] | scales[12] | f16 d |
    #   value v = 32b + l (b < 8, l < 32): low 2 bits at qs[32(b//4) + l] >> 2(b%4),
    #   third bit = hmask[l] >> b; a CLEAR hmask bit subtracts 4       q = low - 4 * !bit
    #   16 six-bit scales (offset 32), one per 16 values; scale i has
    #     bits 0-3: scales[i % 8] >> 4(i // 8)      (bytes 0..7, low nibbles first)
    #     bits 4-5: scales[8 + i % 4] >> 2(i // 4)  (bytes 8..11, 2-bit fields)
    #                                                          value = (d * (scale - 32)) * q
    B = blocks.shape[0]
    d = _f16(blocks, 108)
    s = blocks[:, 96:108]
    lo = (s[:, 0:8].reshape(B, 1, 8) >> _shifts(0, 4, like=s).view(1, 2, 1)).reshape(B, 16)
    hi = _bits(s[:, 8:12], 2)                                    # [B, 16]
    scale = ((lo & 0x0F) | (hi << 4)).float() - 32
    dl = (d * scale).view(B, 16, 1)                              # [B, S, 1]
    low = _bits(blocks[:, 32:96].reshape(B * 2, 32), 2).reshape(B, QK_K)
    bit = _bits(blocks[:, 0:32], 1)                              # [B, 256]
    q = (low.float() - ((bit ^ 1) << 2).float()).view(B, 16, 16)
    return (dl * q).reshape(B, QK_K)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # | f16 d | f16 dmin | scales[12] (see _k_scale_min) | qs[128] |
    #   eight sub-blocks of 32; qs is four 32-byte runs, run c holds sub-block 2c in its low
    #   nibbles and sub-block 2c+1 in its high nibbles
    #                                                          value = (d*sc) * q - (dmin*m)
    B = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _k_scale_min(blocks[:, 4:16])
    dl = (d * sc.float()).view(B, 8, 1)                          # [B, S, 1]
    ml = (dmin * mn.float()).view(B, 8, 1)
    q = _nibbles(blocks[:, 16:144], 32).view(B, 8, 32).float()   # [B, S, L]
    return (dl * q - ml).reshape(B, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # | f16 d | f16 dmin | scales[12] (see _k_scale_min) | qh[32] | qs[128] |
    #   low 4 bits as Q4_K; 5th bit of value 32b + l = qh[l] >> b
    #                                                          value = (d*sc) * q - (dmin*m)
    B = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _k_scale_min(blocks[:, 4:16])
    dl = (d * sc.float()).view(B, 8, 1)
    ml = (dmin * mn.float()).view(B, 8, 1)
    q = _nibbles(blocks[:, 48:176], 32) | (_bits(blocks[:, 16:48], 1) << 4)
    return (dl * q.view(B, 8, 32).float() - ml).reshape(B, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # | ql[128] | qh[64] | int8 scales[16] | f16 d |
    #   two halves of 128 values; in half h, for l < 32:
    #     value      l: ql[64h + l]      low nibble,  qh[32h + l] bits 0-1
    #     value l + 32: ql[64h + l + 32] low nibble,  qh[32h + l] bits 2-3
    #     value l + 64: ql[64h + l]      high nibble, qh[32h + l] bits 4-5
    #     value l + 96: ql[64h + l + 32] high nibble, qh[32h + l] bits 6-7
    #   one scale per 16 values                                value = (d*scale) * (q - 32)
    B = blocks.shape[0]
    d = _f16(blocks, 208)
    scale = blocks[:, 192:208].view(torch.int8).float()
    dl = (d * scale).view(B, 16, 1)                              # [B, S, 1]
    low = _nibbles(blocks[:, 0:128], 64)                         # [B, 256]
    high = _bits(blocks[:, 128:192].reshape(B * 2, 32), 2).reshape(B, QK_K)
    q = (low | (high << 4)).float() - 32
    return (dl * q.view(B, 16, 16)).reshape(B, QK_K)


def _iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    # | f16 d | u16 scales_h | scales_l[4] | qs[128] |
    #   8 six-bit scales (offset 32): low 4 bits = nibble i of scales_l (low nibble first),
    #   high 2 bits = scales_h >> 2i; sub-block i = qs[16i..16i+15], low nibbles then high,
    #   each an index into IQ4_NL_VALUES                       value = (d * (scale - 32)) * grid[q]
    B = blocks.shape[0]
    d = _f16(blocks, 0)
    lo = (blocks[:, 4:8].reshape(B, 4, 1) >> _shifts(0, 4, like=blocks).view(1, 1, 2))
    lo = lo.reshape(B, 8) & 0x0F
    hi = torch.stack([_bits(blocks[:, 2:3], 2), _bits(blocks[:, 3:4], 2)], 1).reshape(B, 8)
    scale = (lo | (hi << 4)).float() - 32
    dl = (d * scale).view(B, 8, 1)
    q = _iq4_lookup(_nibbles(blocks[:, 8:136], 16)).view(B, 8, 32)
    return (dl * q).reshape(B, QK_K)


FORMATS: dict[str, QuantFormat] = {f.name: f for f in (
    QuantFormat("F32", 1, 4, _f32),
    QuantFormat("F16", 1, 2, _f16_plain),
    QuantFormat("BF16", 1, 2, _bf16),
    QuantFormat("Q8_0", 32, 34, _q8_0),
    QuantFormat("Q4_0", 32, 18, _q4_0),
    QuantFormat("Q4_1", 32, 20, _q4_1),
    QuantFormat("Q5_0", 32, 22, _q5_0),
    QuantFormat("Q5_1", 32, 24, _q5_1),
    QuantFormat("IQ4_NL", 32, 18, _iq4_nl),
    QuantFormat("Q2_K", QK_K, 84, _q2_k),
    QuantFormat("Q3_K", QK_K, 110, _q3_k),
    QuantFormat("Q4_K", QK_K, 144, _q4_k),
    QuantFormat("Q5_K", QK_K, 176, _q5_k),
    QuantFormat("Q6_K", QK_K, 210, _q6_k),
    QuantFormat("IQ4_XS", QK_K, 136, _iq4_xs),
)}

SUPPORTED_TYPES: frozenset[str] = frozenset(FORMATS)
FLOAT_TYPES: frozenset[str] = frozenset({"F32", "F16", "BF16"})
# Types with a Triton dequantisation kernel (diffcli.kernels.dequant; a test keeps them in sync).
TRITON_TYPES: frozenset[str] = SUPPORTED_TYPES - FLOAT_TYPES


def require_supported(qtype: str, *, tensor: str | None = None, path=None) -> QuantFormat:
    """The table entry for `qtype`, or an InputError naming the tensor and what to do."""
    fmt = FORMATS.get(qtype)
    if fmt is None:
        what = f"tensor {tensor!r} has type {qtype}" if tensor else f"tensor type {qtype}"
        raise InputError(f"{what}, which diffcli cannot dequantize", path=path,
                         fix=f"re-quantize the model to Q4_K_M or Q8_0 (supported: "
                             f"{', '.join(sorted(SUPPORTED_TYPES))})")
    return fmt


def block_size(qtype: str) -> int:
    """Values per block (1 for the float types)."""
    return require_supported(qtype).block_size


def type_size(qtype: str) -> int:
    """Bytes per block."""
    return require_supported(qtype).type_size


def row_bytes(qtype: str, n: int) -> int:
    """Bytes of `n` consecutive values (n must be a whole number of blocks)."""
    fmt = require_supported(qtype)
    assert n % fmt.block_size == 0, f"{qtype}: {n} values is not a whole number of blocks"
    return n // fmt.block_size * fmt.type_size


def dequantize_torch(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    """uint8 ggml blocks (1-D, or [rows, row_bytes]) -> float32 1-D on the same device."""
    fmt = require_supported(qtype)
    assert raw.dtype == torch.uint8, f"raw blocks must be uint8, got {raw.dtype}"
    assert raw.numel() % fmt.type_size == 0, \
        f"{qtype}: {raw.numel()} bytes is not a whole number of {fmt.type_size}-byte blocks"
    if raw.storage_offset() % 4:   # the float views below need aligned storage
        raw = raw.clone()
    blocks = raw.reshape(-1, fmt.type_size)                     # [B, type_size]
    if fmt.name in FLOAT_TYPES:
        return fmt.dequant(blocks.reshape(-1)).reshape(-1)
    n = blocks.shape[0]
    if n <= _CHUNK_BLOCKS:
        return fmt.dequant(blocks).reshape(-1)
    out = torch.empty((n, fmt.block_size), dtype=torch.float32, device=raw.device)
    for start in range(0, n, _CHUNK_BLOCKS):
        out[start:start + _CHUNK_BLOCKS] = fmt.dequant(blocks[start:start + _CHUNK_BLOCKS])
    return out.reshape(-1)
