"""Grouped routed-expert MLP over quantized expert weights.

Legend: T tokens (256 for a canvas), A active experts per token (8), P = T*A (token, expert) pairs,
E experts (128), K hidden (2816), F expert width (704), BM pairs per tile, BN output columns per tile.

    out[t] = sum_a weights[t, a] * down_e(gelu_tanh(gate_e(x_t)) * up_e(x_t)),  e = ids[t, a]

The pairs are sorted by expert on the device (argsort + searchsorted + cumsum, no host sync, so a
step can be captured in a CUDA graph), so each tile of BM sorted pairs belongs to one expert and
every expert's weights are decoded once per tile straight from the quantized bytes
(qmatmul.decode_tile). Two launches:

1. gate/up: h[p] = gelu_tanh(x_t @ gate_e.T) * (x_t @ up_e.T), both halves of the fused
   [2F, K] expert tensor in one program, the GELU product in the epilogue; h is [P, F] in x.dtype.
2. down: y[pair] = weight[pair] * (h[p] @ down_e.T) in fp32, written in the original pair order;
   the sum over the A pairs of a token is a fixed-order torch reduction, so the result is
   deterministic (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .qmatmul import HALF, LAYOUT, QTYPE_ID, _dot_acc, check_blocks, decode_tile, dot_f32, x_index


@triton.jit
def _gelu_tanh(g):
    # 0.5*g*(1 + tanh(u)) == g*sigmoid(2u), u = sqrt(2/pi)*(g + 0.044715 g^3); sigmoid is in every tl
    u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    u = tl.minimum(tl.maximum(u, -30.0), 30.0)          # sigmoid is 0/1 there; avoids exp overflow
    return g * tl.sigmoid(2.0 * u)


@triton.jit
def _tile_rows(tile_expert, tile_start, seg_start, counts, E, BM: tl.constexpr):
    """The expert of this program's tile and its BM sorted-pair rows (with a validity mask)."""
    pid = tl.program_id(0)
    e_raw = tl.load(tile_expert + pid)
    e = tl.where(e_raw < E, e_raw, 0)
    first = tl.load(seg_start + e) + (pid - tl.load(tile_start + e)) * BM
    last = tl.load(seg_start + e) + tl.load(counts + e)
    rows = first + tl.arange(0, BM)
    # the expert test is broadcast over rows by hand: the interpreter rejects scalar-bool masks
    return e, rows, (rows < last) & ((rows * 0 + e_raw) < E)


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, h_ptr, order, tile_expert, tile_start, seg_start, counts,
                    E, K, F, A, stride_x, expert_bytes, row_bytes, nblk, n_ktiles,
                    QT: tl.constexpr, BK: tl.constexpr, HALF: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, DOT_F32: tl.constexpr):
    HB: tl.constexpr = BK // 2
    e, rows, rvalid = _tile_rows(tile_expert, tile_start, seg_start, counts, E, BM)
    tok = tl.load(order + rows, mask=rvalid, other=0) // A                 # [BM]
    cols = tl.program_id(1) * BN + tl.arange(0, BN)                        # [BN] in 0..F-1
    cmask = (cols < F)[:, None, None]
    wbase = e.to(tl.int64) * expert_bytes
    gate_off = (wbase + cols.to(tl.int64) * row_bytes)[:, None, None]      # rows 0..F-1
    up_off = gate_off + F * row_bytes                                     # rows F..2F-1
    xrow = x_ptr + tok.to(tl.int64)[:, None] * stride_x
    ka = x_index(QT, HB)                                                   # [HB]
    g = tl.zeros((BM, BN), dtype=tl.float32)
    u = tl.zeros((BM, BN), dtype=tl.float32)
    for kt in range(0, n_ktiles):
        k = kt * BK + ka
        xm = rvalid[:, None] & (k[None, :] < K)
        xa = tl.load(xrow + k[None, :], mask=xm, other=0.0)               # [BM, HB]
        xb = tl.load(xrow + (k + HALF)[None, :], mask=xm, other=0.0)
        wa, wb = decode_tile(w_ptr, gate_off, kt, nblk, cmask, QT, BN, HB)
        g = _dot_acc(g, xa, wa, DOT_F32)
        g = _dot_acc(g, xb, wb, DOT_F32)
        wa, wb = decode_tile(w_ptr, up_off, kt, nblk, cmask, QT, BN, HB)
        u = _dot_acc(u, xa, wa, DOT_F32)
        u = _dot_acc(u, xb, wb, DOT_F32)
    h = _gelu_tanh(g) * u
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * F + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=rvalid[:, None] & (cols[None, :] < F))


@triton.jit
def _down_kernel(h_ptr, w_ptr, y_ptr, order, pair_w, tile_expert, tile_start, seg_start, counts,
                 E, K, F, expert_bytes, row_bytes, nblk, n_ktiles,
                 QT: tl.constexpr, BK: tl.constexpr, HALF: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, DOT_F32: tl.constexpr):
    HB: tl.constexpr = BK // 2
    e, rows, rvalid = _tile_rows(tile_expert, tile_start, seg_start, counts, E, BM)
    pair = tl.load(order + rows, mask=rvalid, other=0)                    # [BM] original pair
    cols = tl.program_id(1) * BN + tl.arange(0, BN)                        # [BN] in 0..K-1
    cmask = (cols < K)[:, None, None]
    row_off = (e.to(tl.int64) * expert_bytes + cols.to(tl.int64) * row_bytes)[:, None, None]
    hrow = h_ptr + rows.to(tl.int64)[:, None] * F
    ka = x_index(QT, HB)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kt in range(0, n_ktiles):
        k = kt * BK + ka
        hm = rvalid[:, None] & (k[None, :] < F)
        ha = tl.load(hrow + k[None, :], mask=hm, other=0.0)               # [BM, HB]
        hb = tl.load(hrow + (k + HALF)[None, :], mask=hm, other=0.0)
        wa, wb = decode_tile(w_ptr, row_off, kt, nblk, cmask, QT, BN, HB)
        acc = _dot_acc(acc, ha, wa, DOT_F32)
        acc = _dot_acc(acc, hb, wb, DOT_F32)
    wt = tl.load(pair_w + pair, mask=rvalid, other=0.0).to(tl.float32)    # routing weight
    tl.store(y_ptr + pair.to(tl.int64)[:, None] * K + cols[None, :], acc * wt[:, None],
             mask=rvalid[:, None] & (cols[None, :] < K))


def route(ids: torch.Tensor, E: int, BM: int):
    """Sort the (token, expert) pairs by expert and cut each expert's run into BM-row tiles.

    Returns order [P] (sorted position -> pair index t*A+a), counts/seg_start [E], tile_start [E]
    and tile_expert [max_tiles] (E for tiles past the end). All on ids' device, no host sync:
    max_tiles = ceil(P/BM) + E bounds sum(ceil(count_e/BM)) for any routing."""
    flat = ids.reshape(-1).to(torch.int64)
    P = flat.numel()
    order = torch.argsort(flat, stable=True)
    # expert boundaries in the sorted ids; not bincount, whose CUDA kernel reads max(ids) on the host
    bounds = torch.searchsorted(flat[order], torch.arange(E + 1, device=ids.device))   # [E + 1]
    seg_start, counts = bounds[:-1], bounds[1:] - bounds[:-1]
    tiles = (counts + BM - 1) // BM
    tile_end = torch.cumsum(tiles, 0)
    max_tiles = triton.cdiv(P, BM) + E
    tile_expert = torch.searchsorted(tile_end, torch.arange(max_tiles, device=ids.device),
                                     right=True)
    return order, counts, seg_start, tile_end - tiles, tile_expert, max_tiles


def tile_config(P: int, E: int) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """(BM, gate/up (BN, warps), down (BN, warps)) for P pairs over E experts.

    H100 step profiles (scripts/bench.py, one canvas, 30 layers; the decoder changed between the
    two runs): gate/up 20.7 ms with BN=64 vs 27.8 ms with BN=32; down 24.2 ms with BN=32/8 warps
    vs 28.0 ms with BN=64/4 warps. BM=64 and 8 warps keep sm_90 registers below 180 without
    spills (ptxas); BM=16 for decode-sized P. Re-tune with `scripts/bench.py --sweep`."""
    if P <= 4 * E:
        return 16, (32, 4), (32, 4)
    if P <= 32 * E:                       # a canvas: 256 x 8 pairs over 128 experts
        return 64, (64, 8), (32, 8)
    return 64, (64, 4), (64, 4)            # prefill: x tiles are re-read per N-tile, keep BN wide


def moe_triton(x: torch.Tensor, gate_up, down, ids: torch.Tensor, weights: torch.Tensor,
               block_m: int | None = None, gate_up_cfg: tuple[int, int] | None = None,
               down_cfg: tuple[int, int] | None = None, num_stages: int = 2) -> torch.Tensor:
    """x [T, K]; gate_up QTensor [E, 2F, K]; down QTensor [E, K, F]; ids, weights [T, A] -> [T, K].

    block_m and the (BN, num_warps) pairs override `tile_config` (for benchmarks)."""
    assert x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    T, K = x.shape
    E, F2, Kg = gate_up.shape
    F = F2 // 2
    assert Kg == K and F2 == 2 * F, f"gate_up {tuple(gate_up.shape)} does not match x {(T, K)}"
    assert tuple(down.shape) == (E, K, F), f"down {tuple(down.shape)}, expected {(E, K, F)}"
    assert ids.shape == weights.shape and ids.dim() == 2 and ids.shape[0] == T
    assert not ids.dtype.is_floating_point, "ids must be integer expert indices"
    assert x.device == ids.device == weights.device == gate_up.raw.device == down.raw.device
    if gate_up.qtype not in LAYOUT or down.qtype not in LAYOUT:
        return _moe_unfused(x, gate_up, down, ids, weights)
    A = ids.shape[1]
    P = T * A
    out = torch.empty_like(x)
    if P == 0:
        return out.zero_()
    gu_row = check_blocks(gate_up.raw, gate_up.qtype, E * F2, K)
    dn_row = check_blocks(down.raw, down.qtype, E * K, F)
    x = x.contiguous()
    # few pairs per expert (decode-like T): 16-row tiles; otherwise 64 (wgmma-sized, and fewer
    # registers than 32 on sm_90 with BN=32 and 8 warps)
    bm, gu_cfg, dn_cfg = tile_config(P, E)
    bm, gu_cfg, dn_cfg = block_m or bm, gate_up_cfg or gu_cfg, down_cfg or dn_cfg
    order, counts, seg_start, tile_start, tile_expert, n_tiles = route(ids, E, bm)
    pair_w = weights.reshape(-1).to(torch.float32).contiguous()
    f32 = dot_f32(x)

    per, _, bk = LAYOUT[gate_up.qtype]
    h = torch.empty((P, F), dtype=x.dtype, device=x.device)                # sorted pair order
    _gate_up_kernel[(n_tiles, triton.cdiv(F, gu_cfg[0]))](
        x, gate_up.raw, h, order, tile_expert, tile_start, seg_start, counts,
        E, K, F, A, x.stride(0), F2 * gu_row, gu_row, K // per, triton.cdiv(K, bk),
        QT=QTYPE_ID[gate_up.qtype], BK=bk, HALF=HALF[gate_up.qtype], BM=bm, BN=gu_cfg[0],
        DOT_F32=f32, num_warps=gu_cfg[1], num_stages=num_stages)

    per, _, bk = LAYOUT[down.qtype]
    y = torch.empty((P, K), dtype=torch.float32, device=x.device)          # original pair order
    _down_kernel[(n_tiles, triton.cdiv(K, dn_cfg[0]))](
        h, down.raw, y, order, pair_w, tile_expert, tile_start, seg_start, counts,
        E, K, F, K * dn_row, dn_row, F // per, triton.cdiv(F, bk),
        QT=QTYPE_ID[down.qtype], BK=bk, HALF=HALF[down.qtype], BM=bm, BN=dn_cfg[0],
        DOT_F32=f32, num_warps=dn_cfg[1], num_stages=num_stages)
    return y.view(T, A, K).sum(dim=1).to(x.dtype)


def _moe_unfused(x, gate_up, down, ids, weights):
    """Formats without a fused decoder: per-expert Triton dequantize + matmul (slow, rare)."""
    from .dequant import dequantize_triton
    E, F2, K = gate_up.shape
    T, A = ids.shape
    out = torch.zeros((T, K), dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():                                   # host sync, rare path
        t, a = torch.nonzero(ids == e, as_tuple=True)
        gu = dequantize_triton(gate_up[e].raw, gate_up.qtype, F2 * K, x.dtype).view(F2, K)
        dn = dequantize_triton(down[e].raw, down.qtype, K * F2 // 2, x.dtype).view(K, F2 // 2)
        g, u = (x[t] @ gu.t()).float().chunk(2, dim=-1)
        h = (torch.nn.functional.gelu(g, approximate="tanh") * u).to(x.dtype)
        out.index_add_(0, t, (h @ dn.t()).float() * weights[t, a, None].float())
    return out.to(x.dtype)
