"""Weights repacked once for the GPU: the ggml blocks of one tensor split into planar arrays.

The grouped matmuls of kernels/mmq.py read one group of 32 values at a time as an integer MMA
operand plus its float scale. ggml's blocks make that costly: Q5_0 and Q8_0 blocks are 22 and 34
bytes (no aligned vector loads), Q4_K packs eight 6-bit scales and mins into 12 bytes (a dozen
integer ops per group to unpack), Q6_K spreads a group over three runs of bytes. `repack` rewrites a
tensor once, on its device, into planes with every row 16-byte aligned and every scale a whole byte.

Legend: R rows (the product of shape[:-1]), K values per row, G = K/32 groups of 32 values,
GP = ceil(G/2) pairs of groups, SB = K/256 super-blocks (K-quants).

Planes per row; value (i) of group (g) is element 32g + i of the row:

    qs    uint8 [R, GP*32]   the low 4 bits of every value, two groups per 32-byte run: byte i of run
                             p = value i of group 2p (low nibble) | value i of group 2p+1 (high
                             nibble). This is Q4_K's own order: one 32-byte load per row yields the
                             [32]-operands of two groups.          Q8_0: int8 [R, K], the values.
    qh    Q5_0  int32 [R, G]     bit i = the 5th bit of value i of group g
          Q6_K  uint8 [R, GP*16] byte t of run p: the top 2 bits of values t, t+16 of group 2p (bits
                                 0-1, 2-3) and of values t, t+16 of group 2p+1 (bits 4-5, 6-7)
    sc    Q4_K  uint8 [R, G]     the 6-bit scale of group g;  Q6_K int8 [R, 2G]: one per 16 values
    mn    Q4_K  uint8 [R, G]     the 6-bit min of group g
    d     f16   [R, SB] (Q4_K, Q6_K: the super-block scale) or [R, G] (Q5_0, Q8_0: the block's)
    dmin  f16   [R, SB] (Q4_K)

    value = (d*sc)*q - dmin*mn (Q4_K)   d*(q - 16) (Q5_0)   (d*sc)*(q - 32) (Q6_K)   d*q (Q8_0)

Sizes per 256 values: Q4_K 148 bytes (ggml: 144), Q6_K 210 (210), Q5_0 176 (176), Q8_0 272 (272).
`unpack` turns the planes back into float32 values in gguf-py's order of operations (bit-exact
with `gguf.quants.dequantize`, checked in tests/test_mmq_triton.py). Torch ops only: the repack runs
wherever the bytes are. This module reads raw bytes and writes tensors; it knows no model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# qtype -> (values per ggml block, bytes per ggml block)
BLOCKS = {"Q4_K": (256, 144), "Q5_0": (32, 22), "Q6_K": (256, 210), "Q8_0": (32, 34)}
PACKABLE = frozenset(BLOCKS)


@dataclass
class Packed:
    """One tensor in the planar layout above. Unused planes are 16-byte placeholders, so every
    field can be passed to a kernel as a pointer."""
    qtype: str
    shape: tuple[int, ...]
    qs: torch.Tensor
    qh: torch.Tensor
    sc: torch.Tensor
    mn: torch.Tensor
    d: torch.Tensor
    dmin: torch.Tensor

    @property
    def rows(self) -> int:
        return _rows(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.qs, self.qh, self.sc, self.mn, self.d, self.dmin))

    def planes(self) -> tuple[torch.Tensor, ...]:
        return self.qs, self.qh, self.sc, self.mn, self.d, self.dmin


def _rows(shape) -> int:
    n = 1
    for s in shape[:-1]:
        n *= s
    return n


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The f16 field at byte `at` of every block [B, bytes] -> f16 [B]."""
    return b[:, at:at + 2].contiguous().view(torch.float16).reshape(-1)


def _pairs(low4: torch.Tensor, R: int, G: int) -> torch.Tensor:
    """Low 4 bits of every value, uint8 [R, G, 32] -> the qs plane [R, GP*32] (pair order)."""
    if G % 2:
        low4 = torch.cat([low4, torch.zeros_like(low4[:, :1])], dim=1)
    low4 = low4.view(R, -1, 2, 32)
    return (low4[:, :, 0] | (low4[:, :, 1] << 4)).reshape(R, -1).contiguous()


def _unpairs(qs: torch.Tensor, R: int, G: int) -> torch.Tensor:
    """The qs plane -> uint8 [R, G, 32] of low 4 bits."""
    q = qs.view(R, -1, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8,
                                               device=qs.device).view(1, 1, 2, 1)
    return (q & 15).reshape(R, -1, 32)[:, :G]


def _values_q4_k(b: torch.Tensor):
    """Q4_K blocks [B, 144] -> (q uint8 [B, 8, 32], sc, mn uint8 [B, 8], d, dmin f16 [B])."""
    B = b.shape[0]
    s = b[:, 4:16]
    lo, mid, top = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo & 63, (top & 15) | ((lo >> 6) << 4)], dim=1)
    mn = torch.cat([mid & 63, (top >> 4) | ((mid >> 6) << 4)], dim=1)
    runs = b[:, 16:144].view(B, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8,
                                                           device=b.device).view(1, 1, 2, 1)
    return (runs & 15).reshape(B, 8, 32), sc, mn, _f16(b, 0), _f16(b, 2)


def _values_q6_k(b: torch.Tensor):
    """Q6_K blocks [B, 210] -> (q uint8 [B, 256] in 0..63, scales int8 [B, 16], d f16 [B])."""
    B = b.shape[0]
    sh4 = torch.tensor([0, 4], dtype=torch.uint8, device=b.device).view(1, 1, 2, 1)
    low = ((b[:, 0:128].reshape(B, 2, 1, 64) >> sh4) & 15).reshape(B, 256)
    sh2 = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
    high = ((b[:, 128:192].reshape(B, 2, 1, 32) >> sh2) & 3).reshape(B, 256)
    return low | (high << 4), b[:, 192:208].contiguous().view(torch.int8), _f16(b, 208)


def repack(raw: torch.Tensor, qtype: str, shape: tuple[int, ...]) -> Packed:
    """ggml blocks (uint8, contiguous, one row = shape[-1] values) -> Packed, on raw's device."""
    assert qtype in BLOCKS, f"no repacked layout for {qtype}"
    per, bsize = BLOCKS[qtype]
    K = shape[-1]
    R = _rows(shape)
    assert K % per == 0, f"{qtype}: row length {K} not a multiple of {per}"
    assert raw.dtype == torch.uint8 and raw.is_contiguous() and raw.numel() == R * K // per * bsize, \
        f"{qtype}: {raw.numel()} bytes for shape {tuple(shape)}"
    G = K // 32
    b = raw.reshape(-1, bsize)
    empty = torch.zeros(16, dtype=torch.uint8, device=raw.device)   # an unused plane: a valid pointer
    qh = sc = mn = dmin = empty
    if qtype == "Q4_K":
        q, sc, mn, d, dmin = _values_q4_k(b)
        qs = _pairs(q.reshape(R, G, 32), R, G)
        sc, mn = sc.reshape(R, G).contiguous(), mn.reshape(R, G).contiguous()
        d, dmin = d.reshape(R, -1).contiguous(), dmin.reshape(R, -1).contiguous()
    elif qtype == "Q6_K":
        q, s, d = _values_q6_k(b)
        q = q.reshape(R, G, 32)
        qs = _pairs(q & 15, R, G)
        top = (q >> 4).view(R, G, 2, 16)                          # [R, G, half, t]
        byte = top[:, :, 0] | (top[:, :, 1] << 2)                  # [R, G, 16]: bits 0-3
        if G % 2:
            byte = torch.cat([byte, torch.zeros_like(byte[:, :1])], dim=1)
        byte = byte.view(R, -1, 2, 16)
        qh = (byte[:, :, 0] | (byte[:, :, 1] << 4)).reshape(R, -1).contiguous()
        sc, d = s.reshape(R, 2 * G).contiguous(), d.reshape(R, -1).contiguous()
    elif qtype == "Q5_0":
        d = _f16(b, 0).reshape(R, G).contiguous()
        qh = b[:, 2:6].contiguous().view(torch.int32).reshape(R, G).contiguous()
        nib = b[:, 6:22].view(-1, 1, 16) >> torch.tensor([0, 4], dtype=torch.uint8,
                                                         device=b.device).view(1, 2, 1)
        qs = _pairs((nib & 15).reshape(R, G, 32), R, G)
    else:                                                          # Q8_0
        d = _f16(b, 0).reshape(R, G).contiguous()
        qs = b[:, 2:34].contiguous().view(torch.int8).reshape(R, K).contiguous()
    return Packed(qtype, tuple(shape), qs, qh, sc, mn, d, dmin)


def unpack(p: Packed) -> torch.Tensor:
    """float32 [R, K] values of a Packed tensor, in gguf-py's order of float operations."""
    R, K = p.rows, p.shape[-1]
    G = K // 32
    if p.qtype == "Q8_0":
        return (p.qs.view(R, G, 32).float() * p.d.float().view(R, G, 1)).view(R, K)
    low = _unpairs(p.qs, R, G).to(torch.int32)                     # [R, G, 32]
    if p.qtype == "Q4_K":
        dl = p.d.float().repeat_interleave(8, dim=1) * p.sc.float()            # [R, G]
        ml = p.dmin.float().repeat_interleave(8, dim=1) * p.mn.float()
        return (dl[..., None] * low.float() - ml[..., None]).view(R, K)
    if p.qtype == "Q5_0":
        bits = (p.qh.view(R, G, 1) >> torch.arange(32, device=p.qh.device).view(1, 1, 32)) & 1
        return (p.d.float().view(R, G, 1) * ((low | (bits << 4)) - 16).float()).view(R, K)
    # Q6_K: the top bits of value i of group g sit in qh run g//2, byte i%16, at bit
    # 4*(g%2) + 2*(i//16)
    g = torch.arange(G, device=p.qs.device).view(1, G, 1)
    i = torch.arange(32, device=p.qs.device).view(1, 1, 32)
    byte = p.qh.view(R, -1, 16).to(torch.int32)[:, g // 2, i % 16].view(R, G, 32)
    top = (byte >> (4 * (g % 2) + 2 * (i // 16))) & 3
    q = (low | (top << 4)) - 32
    dl = p.d.float().repeat_interleave(16, dim=1) * p.sc.float()               # [R, 2G]
    return (dl.view(R, G, 2, 1) * q.view(R, G, 2, 16).float()).view(R, K)
