"""Grouped quantized matmuls: the weights stay integers, float scales are applied per group of 32.

Legend: T rows of x (256 for a canvas), K in-features, N out-features, G = K/32 groups, BM/BN the
output tile, GPI groups per loop iteration (unrolled), q the weight's integers, a/b its per-group
scale and min, S[t, g] the sum of x over group g of row t.

    y[t, n] = sum_g  a[n, g] * <x[t, g], q[n, g]>  -  b[n, g] * S[t, g]

(Q6_K has a scale per 16 values: its group is two halves with scales a, a2. b is Q4_K's min; the
symmetric types have none.) Today's kernels (qmatmul.py, moe.py) turn every weight into a float,
then round it to bf16 for the dot: an int-to-float conversion, a multiply-add and a float-to-bf16
conversion per weight, ~350-750 G weights/s on an H100 against the ~5 T/s the memory allows. Here
the per-weight work is integer unpacking only; the float work is per (row, column, group), i.e.
BM/32 of an op per weight. Two designs (issue 17), and the two other pairings of their halves, set
by two constexprs:

- ACT, the activation operand: 0 = x itself, against q converted to x's dtype (exact: |q| <= 128
  fits bf16's 8-bit significand), tensor-core dot with fp32 sums; 1 = llama.cpp's q8_1: each group
  of x as int8 with a scale d = max|x_g|/127 and its float sum S, int8 dot into int32; 2 = the
  same plus a second int8 plane holding the rounding residual at step d/254, so
  x ~ d (q1 + q2/254) and <x, q> = (d/254) (254 <q1, q> + <q2, q>) from two int8 dots.
- SRC, the weight operand: 0 = the ggml blocks as stored; 1 = the planes of kernels/repack.py
  (aligned rows, byte-wide scales, made once per tensor).

Named variants (`VARIANTS`): "mmq" = ACT 2, SRC 0 (design a, as llama.cpp's MMQ with the residual
plane); "mmq1" = ACT 1, SRC 0 (exactly llama.cpp's q8_1 activations); "repack" = ACT 0, SRC 1
(design b: repacked weights, bf16 MMA); "mmq+repack" = ACT 2, SRC 1; "exact" = ACT 0, SRC 0.
kernels/select.py says which serves which shape; today's kernels stay the default.

Numerics, against the product of x (as given) and the exactly dequantized weight, with
u = 2^-8 (bf16's unit roundoff) and sums in fp32:
- today's bf16 path rounds each weight to bf16 (error <= u|w|) and the output (<= u|y|); its
  relative error on random data is ~2.3e-3 (H100, scripts/bench_notes.md).
- ACT 0 rounds no weight: q is exact, x*q is exact in fp32, the scales are applied in fp32. What
  is left is the output rounding: ~0.55-0.7x today's error. The +128 bias of the operand makes
  the fp32 sums cancel ~15x (5e-6 relative at K = 256): invisible under a bf16 output, but it is
  why select.py applies its choices to bf16/fp16 activations only.
- ACT 1 adds the int8 rounding of x, uniform within +-d/2: relative rms about
  max|x_g| / (127 sqrt(12) rms(x)), 5.5e-3 for Gaussian groups (max ~2.4 sigma), 9e-3 for
  heavier-tailed ones such as the MoE's gelu(g)*u. That is 2.4-3.9x today's error on such data
  (float64 simulation, K = 2816): outside the 1.5x that issue 17 allows, so gpu_check.py never
  picks it; it is here to measure what llama.cpp's exact choice costs and saves.
- ACT 2 leaves a residual within +-d/508: 254x smaller, below the output rounding (~0.55-0.7x).
tests/test_mmq_triton.py derives each bound from these terms on the test's own data.

int32 range (ACT 2): |<q1, q>| <= 32*127*128 = 520,192, so 254 <q1, q> + <q2, q> < 2^31.

Triton used: load/store, arange, dot (int8 -> int32 via out_dtype, bf16/fp16/fp32 -> fp32),
trans, where, sum/max, floor, static_range, bitcast casts: all in Triton 3.0, so the same code runs
on Triton 3.6 (GPU) and under TRITON_INTERPRET=1 (3.9) on CPU. int8 dots take K = 32 (the
smallest a GPU int8 dot allows). Under the interpreter bf16 dots are computed in fp32 (its bf16
dot is broken); both operands are exact in fp32 there, so that changes nothing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant import _f16, _i8, _u8
from .qmatmul import QTYPE_ID, dot_f32
from .repack import PACKABLE, Packed, repack

# variant -> (ACT, SRC)
VARIANTS = {"mmq": (2, 0), "mmq1": (1, 0), "repack": (0, 1), "mmq+repack": (2, 1), "exact": (0, 0)}
ROW_BYTES = {"Q8_0": (32, 34), "Q5_0": (32, 22), "Q4_K": (256, 144), "Q6_K": (256, 210)}
SUPPORTED = frozenset(ROW_BYTES)
RES = 254                      # the residual plane's step is d / RES


# -- activations: x -> int8 planes, per-group step and sum -------------------------------------

@triton.jit
def _quantize_kernel(x_ptr, q_ptr, d_ptr, s_ptr, G, stride_x, plane,
                     PLANES: tl.constexpr, BG: tl.constexpr):
    """Row t, groups [BG]: q1 = round(x * 127/max|x_g|), q2 = round((x*127/max - q1) * RES),
    d = max/127 (PLANES 1) or max/(127*RES) (PLANES 2), s = sum x (fp32)."""
    t = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * BG + tl.arange(0, BG)                       # [BG]
    i = tl.arange(0, 32)
    m = (g < G)[:, None]
    off = g.to(tl.int64)[:, None] * 32 + i[None, :]                    # [BG, 32]
    x = tl.load(x_ptr + t * stride_x + off, mask=m, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)                                   # [BG]
    inv = tl.where(amax > 0, 127.0 / amax, 0.0)
    v = x * inv[:, None]
    q1 = tl.floor(v + 0.5)
    row = t * G * 32                                  # int64 (t is); G may be a constexpr 1
    tl.store(q_ptr + row + off, q1.to(tl.int8), mask=m)
    if PLANES == 2:
        q2 = tl.floor((v - q1) * 254.0 + 0.5)
        tl.store(q_ptr + plane + row + off, q2.to(tl.int8), mask=m)
        d = amax / (127.0 * 254.0)
    else:
        d = amax / 127.0
    gm = g < G
    tl.store(d_ptr + t * G + g, d, mask=gm)
    tl.store(s_ptr + t * G + g, tl.sum(x, axis=1), mask=gm)


def quantize_act(x: torch.Tensor, planes: int):
    """x [T, K] (K % 32 == 0) -> (q int8 [planes, T, K], d fp32 [T, G], s fp32 [T, G])."""
    assert x.dim() == 2 and x.shape[1] % 32 == 0 and x.stride(1) == 1, \
        f"x must be [T, K] with K % 32 == 0 and unit column stride, got {tuple(x.shape)}"
    assert planes in (1, 2)
    T, K = x.shape
    G = K // 32
    q = torch.empty((planes, T, K), dtype=torch.int8, device=x.device)
    d = torch.empty((T, G), dtype=torch.float32, device=x.device)
    s = torch.empty((T, G), dtype=torch.float32, device=x.device)
    if T:
        bg = 8
        _quantize_kernel[(T, triton.cdiv(G, bg))](x, q, d, s, G, x.stride(0), T * K,
                                                 PLANES=planes, BG=bg)
    return q, d, s


# -- one group of 32: activations, weights, the dot and its scales ------------------------------

@triton.jit
def _act_group(x_ptr, xq_ptr, xd_ptr, xs_ptr, arow, amask, g, G, stride_x, plane,
               ACT: tl.constexpr):
    """Group g of the activation rows `arow` (int64 [BM]): (xa, xb, xd, xs). ACT 0: xa = x [BM, 32]
    in x's dtype (the rest unused); ACT 1/2: the int8 planes, the step and the float sum."""
    i = tl.arange(0, 32)[None, :]
    m = amask[:, None]
    if ACT == 0:
        xa = tl.load(x_ptr + arow[:, None] * stride_x + g * 32 + i, mask=m, other=0.0)
        xb = xa
        xd = tl.zeros_like(arow).to(tl.float32)
        xs = xd
    else:
        off = arow[:, None] * G * 32 + g * 32 + i          # int64 from arow (G may be a constexpr 1)
        xa = tl.load(xq_ptr + off, mask=m, other=0)
        if ACT == 2:
            xb = tl.load(xq_ptr + plane + off, mask=m, other=0)
        else:
            xb = xa
        xd = tl.load(xd_ptr + arow * G + g, mask=amask, other=0.0)
        xs = tl.load(xs_ptr + arow * G + g, mask=amask, other=0.0)
    return xa, xb, xd, xs


@triton.jit
def _q4_k_scale_min(w_ptr, at, s, rmask):
    """Six-bit (scale, min) of sub-block s (a scalar, 0..7) from the 12 bytes at `at` [BN]."""
    a = _u8(w_ptr, at + s % 4, rmask)
    b = _u8(w_ptr, at + 4 + s % 4, rmask)
    c = _u8(w_ptr, at + 8 + s % 4, rmask)
    first = (a * 0 + s) < 4
    sc = tl.where(first, a & 63, (c & 15) | ((a >> 6) << 4))
    mn = tl.where(first, b & 63, (c >> 4) | ((b >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _w_group(w0, w1, w2, w3, w4, w5, row, rmask, g, G, row_bytes,
             QT: tl.constexpr, SRC: tl.constexpr):
    """Group g of the weight rows `row` (int64 [BN]) -> (u int32 [BN, 32], a, a2, b fp32 [BN]).

    SRC 0: w0 is the ggml bytes, `row_bytes` per row. SRC 1: w0..w5 are the planes qs, qh, sc, mn,
    d, dmin of kernels/repack.py. u is the integer as stored: the weight's q is u - _offset(QT)
    (Q5_0 16, Q6_K 32; Q8_0's u is already signed, Q4_K's 0..15 has the min b instead); a2 is
    the scale of values 16..31 (differs from a for Q6_K only)."""
    i = tl.arange(0, 32)[None, :]
    m = rmask[:, None]
    if SRC == 0:
        if QT == 0:                                        # Q8_0 | f16 d | int8 q[32] |
            base = row * row_bytes + g * 34
            a = _f16(w0, base, rmask)
            q = _i8(w0, base[:, None] + 2 + i, m)
            b = a * 0.0
        elif QT == 1:                                      # Q5_0 | f16 d | u32 qh | qs[16] |
            base = row * row_bytes + g * 22
            a = _f16(w0, base, rmask)
            bit = (_u8(w0, base[:, None] + 2 + i // 8, m) >> (i % 8)) & 1
            nib = (_u8(w0, base[:, None] + 6 + i % 16, m) >> (4 * (i // 16))) & 15
            q = nib | (bit << 4)
            b = a * 0.0
        elif QT == 2:                                      # Q4_K, sub-block s of super-block
            s = g % 8
            base = row * row_bytes + (g // 8) * 144
            sc, mn = _q4_k_scale_min(w0, base + 4, s, rmask)
            a = _f16(w0, base, rmask) * sc
            b = _f16(w0, base + 2, rmask) * mn
            q = (_u8(w0, base[:, None] + 16 + 32 * (s // 2) + i, m) >> (4 * (s % 2))) & 15
        else:                                              # Q6_K, values 32s..32s+31
            s = g % 8
            h = s // 4
            r = s % 4
            base = row * row_bytes + (g // 8) * 210
            ql = _u8(w0, base[:, None] + 64 * h + 32 * (r % 2) + i, m)
            qh = _u8(w0, base[:, None] + 128 + 32 * h + i, m)
            q = ((ql >> (4 * (r // 2))) & 15) | (((qh >> (2 * r)) & 3) << 4)
            d = _f16(w0, base + 208, rmask)
            a = d * _i8(w0, base + 192 + 2 * s, rmask).to(tl.float32)
            b = d * _i8(w0, base + 193 + 2 * s, rmask).to(tl.float32)
    else:
        if QT == 0:
            q = tl.load(w0 + row[:, None] * G * 32 + g * 32 + i, mask=m,
                        other=0).to(tl.int32)
            a = tl.load(w4 + row * G + g, mask=rmask, other=0.0).to(tl.float32)
            b = a * 0.0
        else:
            pairs = (G + 1) // 2
            nib = (_u8(w0, row[:, None] * pairs * 32 + (g // 2) * 32 + i, m)
                   >> (4 * (g % 2))) & 15
            if QT == 1:
                qh = tl.load(w1 + row * G + g, mask=rmask, other=0)
                q = nib | (((qh[:, None] >> i) & 1) << 4)
                a = tl.load(w4 + row * G + g, mask=rmask, other=0.0).to(tl.float32)
                b = a * 0.0
            elif QT == 2:
                sb = row * (G // 8) + g // 8
                a = tl.load(w4 + sb, mask=rmask, other=0.0).to(tl.float32) \
                    * _u8(w2, row * G + g, rmask).to(tl.float32)
                b = tl.load(w5 + sb, mask=rmask, other=0.0).to(tl.float32) \
                    * _u8(w3, row * G + g, rmask).to(tl.float32)
                q = nib
            else:
                top = (_u8(w1, row[:, None] * pairs * 16 + (g // 2) * 16 + i % 16, m)
                       >> (4 * (g % 2) + 2 * (i // 16))) & 3
                q = nib | (top << 4)
                d = tl.load(w4 + row * (G // 8) + g // 8, mask=rmask, other=0.0).to(tl.float32)
                a = d * _i8(w2, row * (2 * G) + 2 * g, rmask).to(tl.float32)
                b = d * _i8(w2, row * (2 * G) + 2 * g + 1, rmask).to(tl.float32)
    if QT == 3:                                            # b held the second half's scale
        a2 = b
        b = a * 0.0
    else:
        a2 = a
    return q, a, a2, b


@triton.jit
def _offset(QT: tl.constexpr):
    """What the stored integer u exceeds the weight's q by: Q5_0 16, Q6_K 32, else 0."""
    if QT == 1:
        return 16
    elif QT == 3:
        return 32
    else:
        return 0


@triton.jit
def _biased(u, like):
    """u + 128 in `like`'s float dtype, for 0 <= u < 128, made from bits (no conversion
    instruction): 128 + u has u as its low significand bits, at the unit of 128's binade."""
    if like.dtype == tl.bfloat16:
        return (u | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    elif like.dtype == tl.float16:
        return ((u << 3) | 0x5800).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        return ((u << 16) | 0x43000000).to(tl.float32, bitcast=True)


@triton.jit
def _fdot(xa, wq, DOT_F32: tl.constexpr):
    """[BM, 32] x [32, BN] float dot with fp32 sums (exact fp32 operands when DOT_F32)."""
    if DOT_F32:
        return tl.dot(xa.to(tl.float32), wq.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(xa, wq)


@triton.jit
def _int_dot(xa, xb, wq, ACT: tl.constexpr):
    """int32 <x, q> in units of the step xd: one int8 plane, or RES * plane 1 + plane 2."""
    p = tl.dot(xa, wq, out_dtype=tl.int32)
    if ACT == 2:
        p = p * 254 + tl.dot(xb, wq, out_dtype=tl.int32)
    return p


@triton.jit
def _dot_group(acc, xa, xb, xd, xs, u, a, a2, b, QT: tl.constexpr, ACT: tl.constexpr,
               DOT_F32: tl.constexpr):
    """acc [BM, BN] += a <x, q> (a2 on values 16..31) - b S for one group.

    ACT 0 feeds v = u + 128 (exact, from bits; Q8_0: q itself, converted) to a float dot:
    <x, q> = <x, v> - (128 + offset) S, with S the group's sum of x in fp32 (per half for Q6_K)."""
    i = tl.arange(0, 32)[None, :]
    if ACT == 0:
        xf = xa.to(tl.float32)
        if QT == 0:
            acc += _fdot(xa, tl.trans(u.to(tl.float32).to(xa.dtype)), DOT_F32) * a[None, :]
        else:
            wv = tl.trans(_biased(u, xa))
            bias = 128.0 + _offset(QT)
            if QT == 3:
                zero = tl.zeros_like(xa)
                lo = _fdot(tl.where(i < 16, xa, zero), wv, DOT_F32)
                hi = _fdot(tl.where(i < 16, zero, xa), wv, DOT_F32)
                s_lo = tl.sum(tl.where(i < 16, xf, 0.0), axis=1)
                s_hi = tl.sum(xf, axis=1) - s_lo
                acc += (lo - bias * s_lo[:, None]) * a[None, :] \
                    + (hi - bias * s_hi[:, None]) * a2[None, :]
            else:
                s = tl.sum(xf, axis=1)
                acc += _fdot(xa, wv, DOT_F32) * a[None, :] - s[:, None] * (a * bias + b)[None, :]
    else:
        wq = tl.trans((u - _offset(QT)).to(tl.int8))
        if QT == 3:
            zero = tl.zeros_like(xa)
            lo = _int_dot(tl.where(i < 16, xa, zero), tl.where(i < 16, xb, zero), wq, ACT)
            hi = _int_dot(tl.where(i < 16, zero, xa), tl.where(i < 16, zero, xb), wq, ACT)
            acc += xd[:, None] * (lo.to(tl.float32) * a[None, :] + hi.to(tl.float32) * a2[None, :])
        else:
            acc += (_int_dot(xa, xb, wq, ACT).to(tl.float32) * xd[:, None]) * a[None, :]
        if QT == 2:
            acc -= xs[:, None] * b[None, :]
    return acc


# -- dense: y [T, N] = x [T, K] @ W[N, K].T -------------------------------------------------------

@triton.jit
def _grouped_matmul_kernel(x_ptr, xq_ptr, xd_ptr, xs_ptr, w0, w1, w2, w3, w4, w5, y_ptr,
                           T, N, G, stride_x, stride_y, plane, row_bytes,
                           QT: tl.constexpr, SRC: tl.constexpr, ACT: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, GPI: tl.constexpr,
                           DOT_F32: tl.constexpr):
    """y[rows, cols] = sum over groups of _dot_group, GPI groups per iteration."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    rmask = rows < T
    cmask = cols < N
    arow = rows.to(tl.int64)
    wrow = cols.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for it in range(0, tl.cdiv(G, GPI)):
        for u in tl.static_range(GPI):
            g = it * GPI + u
            # the group test is broadcast by hand: the interpreter rejects scalar-bool masks
            xa, xb, xd, xs = _act_group(x_ptr, xq_ptr, xd_ptr, xs_ptr, arow,
                                        rmask & ((rows * 0 + g) < G), g, G, stride_x, plane,
                                        ACT)
            q, a, a2, b = _w_group(w0, w1, w2, w3, w4, w5, wrow, cmask & ((cols * 0 + g) < G),
                                   g, G, row_bytes, QT, SRC)
            acc = _dot_group(acc, xa, xb, xd, xs, q, a, a2, b, QT, ACT, DOT_F32)
    tl.store(y_ptr + arow[:, None] * stride_y + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


def weight_args(w, src: int):
    """(w0..w5, row_bytes) kernel arguments for a QTensor-like `w` (SRC 0) or its planes (1)."""
    if src == 0:
        assert not isinstance(w, Packed), "this variant reads the ggml bytes, not a Packed tensor"
        return (w.raw,) * 6, w.raw.numel() // max(1, _rows(w.shape))
    p = packed_of(w)
    return p.planes(), 0


def packed_of(w) -> Packed:
    """The repacked planes of a QTensor-like `w`, made once and kept on the object (a Packed is
    returned as is). The ggml bytes stay too: other paths read them."""
    if isinstance(w, Packed):
        return w
    p = w.__dict__.get("_packed")
    if p is None:
        assert w.qtype in PACKABLE, f"no repacked layout for {w.qtype}"
        p = repack(w.raw, w.qtype, tuple(w.shape))
        w._packed = p
    return p


def _rows(shape) -> int:
    n = 1
    for s in shape[:-1]:
        n *= s
    return n


def default_config(T: int) -> dict:
    """Untuned starting points (tile sizes as in qmatmul.tile_config); scripts/gpu_check.py sweeps."""
    if T <= 16:
        return dict(BM=16, BN=64, GPI=4, warps=4, stages=2)
    if T <= 64:
        return dict(BM=32, BN=64, GPI=4, warps=4, stages=2)
    return dict(BM=64, BN=64, GPI=4, warps=4, stages=2)


def check_weight(w, K: int):
    assert w.qtype in SUPPORTED, f"grouped kernels take {sorted(SUPPORTED)}, not {w.qtype}"
    per, bsize = ROW_BYTES[w.qtype]
    assert K % per == 0, f"{w.qtype}: in-features {K} not a multiple of {per}"
    if not isinstance(w, Packed):
        raw = w.raw
        assert raw.dtype == torch.uint8 and raw.dim() == 1 and raw.is_contiguous(), \
            "raw blocks must be a contiguous 1-D uint8 tensor"
        assert raw.numel() == _rows(w.shape) * (K // per) * bsize, \
            f"{w.qtype}: {raw.numel()} bytes for shape {tuple(w.shape)}"


def grouped_matmul(x: torch.Tensor, w, variant: str = "mmq", BM: int | None = None,
                   BN: int | None = None, GPI: int | None = None, warps: int | None = None,
                   stages: int | None = None) -> torch.Tensor:
    """x [T, K] (bf16/fp16/fp32) @ W[N, K].T -> [T, N] in x.dtype with the `variant` kernel.

    `w` is a 2-D QTensor-like object (raw ggml bytes, qtype, shape) or a Packed; tile arguments
    override `default_config`."""
    assert variant in VARIANTS, f"unknown variant {variant!r}; one of {sorted(VARIANTS)}"
    act, src = VARIANTS[variant]
    assert x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16, torch.float32), \
        f"x must be 2-D bf16/fp16/fp32, got {tuple(x.shape)} {x.dtype}"
    assert len(w.shape) == 2 and w.shape[1] == x.shape[1], \
        f"weight {tuple(w.shape)} does not match x {tuple(x.shape)}"
    N, K = w.shape
    check_weight(w, K)
    x = x.contiguous()
    T = x.shape[0]
    y = torch.empty((T, N), dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    cfg = default_config(T)
    cfg.update({k: v for k, v in dict(BM=BM, BN=BN, GPI=GPI, warps=warps, stages=stages).items()
                if v is not None})
    wargs, row_bytes = weight_args(w, src)
    G = K // 32
    if act:
        xq, xd, xs = quantize_act(x, act)
    else:
        xq, xd, xs = x, x, x
    grid = (triton.cdiv(T, cfg["BM"]), triton.cdiv(N, cfg["BN"]))
    _grouped_matmul_kernel[grid](x, xq, xd, xs, *wargs, y, T, N, G, x.stride(0), y.stride(0),
                                 T * K, row_bytes, QT=QTYPE_ID[w.qtype], SRC=src, ACT=act,
                                 BM=cfg["BM"], BN=cfg["BN"], GPI=cfg["GPI"],
                                 DOT_F32=dot_f32(x), num_warps=cfg["warps"],
                                 num_stages=cfg["stages"])
    return y
