"""Grouped routed-expert MLP with the integer-weight matmuls of kernels/mmq.py.

Legend: T tokens (256 for a canvas), A active experts per token (8), P = T*A pairs, E experts
(128), K hidden (2816), F expert width (704), G groups of 32 along the reduction, BM pairs per
tile, BN output columns per tile, GPI groups per loop iteration.

    out[t] = sum_a weights[t, a] * down_e(gelu_tanh(gate_e(x_t)) * up_e(x_t)),  e = ids[t, a]

Same structure as kernels/moe.py (pairs sorted by expert on the device with `moe.route`, one
expert per BM-row tile, no host sync, so a step can be captured in a CUDA graph), with the
K-loop of mmq.py: per group of 32, the activation group (x or its int8 planes), the weight
group as integers and its scales, a 32-deep dot, the scales applied to the [BM, BN] result.

1. gate/up: h[p] = gelu_tanh(x_t @ gate_e.T) * (x_t @ up_e.T); the activation group is loaded
   once for both halves of the fused [2F, K] expert tensor. h is [P, F] in x.dtype (sorted order).
2. down: y[pair] = weight[pair] * (h[p] @ down_e.T) in fp32, in the original pair order; the sum
   over a token's A pairs is a fixed-order torch reduction (deterministic, no atomics). With int8
   activations (ACT 1, 2), h is quantized per 32 between the two launches.

Numerics: mmq.py's analysis per matmul. h carries the first matmul's error into the second
(through gelu's slope); tests/test_mmq_triton.py propagates it to bound the result.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mmq import (VARIANTS, _act_group, _dot_group, _w_group, check_weight, quantize_act,
                  weight_args)
from .moe import _gelu_tanh, _tile_rows, route
from .qmatmul import QTYPE_ID, dot_f32


@triton.jit
def _gate_up_grouped_kernel(x_ptr, xq_ptr, xd_ptr, xs_ptr, w0, w1, w2, w3, w4, w5, h_ptr,
                            order, tile_expert, tile_start, seg_start, counts,
                            E, F, A, G, stride_x, plane, row_bytes,
                            QT: tl.constexpr, SRC: tl.constexpr, ACT: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, GPI: tl.constexpr,
                            DOT_F32: tl.constexpr):
    """h[rows, cols] = gelu(x[tok] @ gate_e[cols].T) * (x[tok] @ up_e[cols].T), group by group."""
    e, rows, rvalid = _tile_rows(tile_expert, tile_start, seg_start, counts, E, BM)
    tok = (tl.load(order + rows, mask=rvalid, other=0) // A).to(tl.int64)    # [BM]
    cols = tl.program_id(1) * BN + tl.arange(0, BN)                          # [BN] in 0..F-1
    cmask = cols < F
    grow = e.to(tl.int64) * (2 * F) + cols.to(tl.int64)                      # gate rows
    urow = grow + F                                                          # up rows
    gacc = tl.zeros((BM, BN), dtype=tl.float32)
    uacc = tl.zeros((BM, BN), dtype=tl.float32)
    for it in range(0, tl.cdiv(G, GPI)):
        for u in tl.static_range(GPI):
            g = it * GPI + u
            wm = cmask & ((cols * 0 + g) < G)
            xa, xb, xd, xs = _act_group(x_ptr, xq_ptr, xd_ptr, xs_ptr, tok,
                                        rvalid & ((rows * 0 + g) < G), g, G, stride_x, plane, ACT)
            q, a, a2, b = _w_group(w0, w1, w2, w3, w4, w5, grow, wm, g, G, row_bytes, QT, SRC)
            gacc = _dot_group(gacc, xa, xb, xd, xs, q, a, a2, b, QT, ACT, DOT_F32)
            q, a, a2, b = _w_group(w0, w1, w2, w3, w4, w5, urow, wm, g, G, row_bytes, QT, SRC)
            uacc = _dot_group(uacc, xa, xb, xd, xs, q, a, a2, b, QT, ACT, DOT_F32)
    h = _gelu_tanh(gacc) * uacc
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * F + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=rvalid[:, None] & cmask[None, :])


@triton.jit
def _down_grouped_kernel(h_ptr, hq_ptr, hd_ptr, hs_ptr, w0, w1, w2, w3, w4, w5, y_ptr,
                         order, pair_w, tile_expert, tile_start, seg_start, counts,
                         E, K, G, plane, row_bytes,
                         QT: tl.constexpr, SRC: tl.constexpr, ACT: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, GPI: tl.constexpr,
                         DOT_F32: tl.constexpr):
    """y[pair, cols] = weight[pair] * (h[rows] @ down_e[cols].T), group by group over F."""
    e, rows, rvalid = _tile_rows(tile_expert, tile_start, seg_start, counts, E, BM)
    pair = tl.load(order + rows, mask=rvalid, other=0)                      # [BM] original pair
    cols = tl.program_id(1) * BN + tl.arange(0, BN)                          # [BN] in 0..K-1
    cmask = cols < K
    wrow = e.to(tl.int64) * K + cols.to(tl.int64)
    hrow = rows.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for it in range(0, tl.cdiv(G, GPI)):
        for u in tl.static_range(GPI):
            g = it * GPI + u
            xa, xb, xd, xs = _act_group(h_ptr, hq_ptr, hd_ptr, hs_ptr, hrow,
                                        rvalid & ((rows * 0 + g) < G), g, G, G * 32, plane, ACT)
            q, a, a2, b = _w_group(w0, w1, w2, w3, w4, w5, wrow, cmask & ((cols * 0 + g) < G),
                                   g, G, row_bytes, QT, SRC)
            acc = _dot_group(acc, xa, xb, xd, xs, q, a, a2, b, QT, ACT, DOT_F32)
    wt = tl.load(pair_w + pair, mask=rvalid, other=0.0).to(tl.float32)      # routing weight
    tl.store(y_ptr + pair.to(tl.int64)[:, None] * K + cols[None, :], acc * wt[:, None],
             mask=rvalid[:, None] & cmask[None, :])


def default_config(P: int, E: int) -> dict:
    """Untuned: BM=16 pairs (a canvas has ~16 pairs per expert), 64 columns; gpu_check sweeps."""
    bm = 16 if P <= 32 * E else 64
    return dict(BM=bm, BN=64, GPI=4, warps=4, stages=2, down_BN=64, down_warps=4)


def moe_grouped(x: torch.Tensor, gate_up, down, ids: torch.Tensor, weights: torch.Tensor,
                variant: str = "mmq", **tiles) -> torch.Tensor:
    """x [T, K]; gate_up [E, 2F, K]; down [E, K, F] (QTensor-like or Packed); ids, weights [T, A]
    -> [T, K] in x.dtype. `tiles` override `default_config` (BM, BN, GPI, warps, stages for
    gate/up, down_BN and down_warps for down)."""
    assert variant in VARIANTS, f"unknown variant {variant!r}; one of {sorted(VARIANTS)}"
    act, src = VARIANTS[variant]
    assert x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    T, K = x.shape
    E, F2, Kg = gate_up.shape
    F = F2 // 2
    assert Kg == K and F2 == 2 * F, f"gate_up {tuple(gate_up.shape)} does not match x {(T, K)}"
    assert tuple(down.shape) == (E, K, F), f"down {tuple(down.shape)}, expected {(E, K, F)}"
    assert ids.shape == weights.shape and ids.dim() == 2 and ids.shape[0] == T
    assert not ids.dtype.is_floating_point, "ids must be integer expert indices"
    check_weight(gate_up, K)
    check_weight(down, F)
    A = ids.shape[1]
    P = T * A
    if P == 0:
        return torch.zeros_like(x)
    cfg = default_config(P, E)
    cfg.update({k: v for k, v in tiles.items() if v is not None})
    bm = cfg["BM"]
    x = x.contiguous()
    order, counts, seg_start, tile_start, tile_expert, n_tiles = route(ids, E, bm)
    pair_w = weights.reshape(-1).to(torch.float32).contiguous()
    f32 = dot_f32(x)
    common = dict(SRC=src, ACT=act, BM=bm, GPI=cfg["GPI"], DOT_F32=f32, num_stages=cfg["stages"])

    gw, gu_rb = weight_args(gate_up, src)
    xq, xd, xs = quantize_act(x, act) if act else (x, x, x)
    h = torch.empty((P, F), dtype=x.dtype, device=x.device)                # sorted pair order
    _gate_up_grouped_kernel[(n_tiles, triton.cdiv(F, cfg["BN"]))](
        x, xq, xd, xs, *gw, h, order, tile_expert, tile_start, seg_start, counts,
        E, F, A, K // 32, x.stride(0), T * K, gu_rb, QT=QTYPE_ID[gate_up.qtype], BN=cfg["BN"],
        num_warps=cfg["warps"], **common)

    dw, dn_rb = weight_args(down, src)
    hq, hd, hs = quantize_act(h, act) if act else (h, h, h)
    y = torch.empty((P, K), dtype=torch.float32, device=x.device)          # original pair order
    _down_grouped_kernel[(n_tiles, triton.cdiv(K, cfg["down_BN"]))](
        h, hq, hd, hs, *dw, y, order, pair_w, tile_expert, tile_start, seg_start, counts,
        E, K, F // 32, P * F, dn_rb, QT=QTYPE_ID[down.qtype], BN=cfg["down_BN"],
        num_warps=cfg["down_warps"], **common)
    return y.view(T, A, K).sum(dim=1).to(x.dtype)

