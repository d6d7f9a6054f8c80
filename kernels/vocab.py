"""Vocabulary-side head: softcapped logits, sampler statistics and the self-conditioning input.

Legend: C canvas rows (256), H hidden (2816), V vocabulary (262144), E the tied embedding [V, H]
(a dense bf16 copy on the GPU), cap the final-logit softcap (30), tau the step's temperature.
BM canvas rows per program, BV vocabulary rows per tile, BK hidden columns per dot step (pass 1),
BH hidden columns of the soft embedding per program (pass 2).

What is computed (`vocab_head_torch` is the plain torch version, and the oracle):

    logits  = cap * tanh((x @ E.T).float() / cap)          # [C, V] fp32 (optional output)
    l       = logits / tau
    argmax  = l.argmax(-1)                                  # [C] lowest index on ties
    lse     = logsumexp(l)                                  # [C]
    entropy = entr(softmax(l)).sum(-1)                      # [C] as sampler.token_entropy
    soft    = softmax(l).to(E.dtype) @ E                    # [C, H] fp32 (model.denoise's SC input
                                                            #  before the sqrt(H) scale)

`x @ E.T` is rounded to x's dtype before the softcap, as torch's matmul (and so model.denoise and
transformers) does; the kernel accumulates in fp32 and rounds the same way.

Design: two launches plus a few tiny torch ops.

Pass 1 (`_stats_kernel`), grid (C/BM, S1): each program owns BM canvas rows and a contiguous range
of V-tiles (split S1 of the vocabulary, so that a 256-row canvas still fills the GPU). Per tile it
computes the [BM, BV] scores with tl.dot over H in BK chunks, the softcap, optionally stores the
logits, and updates flash-attention style running statistics per row: max m and its (lowest)
index, s = sum exp(l - m) and t = sum exp(l - m) * (l - m), both rescaled by exp(m_old - m_new)
when m grows (t also gains (m_old - m_new) * s). Entropy is then log(s) - t/s, with no
cancellation against m. It also writes q = exp(l - m_tile) in E's dtype, m_tile being the running
max after that tile ([C, V] q plus [C, V/BV] fp32 maxima): the unnormalised probabilities, so that
pass 2 needs neither the softcap nor an exp. The S1 partial statistics are merged in torch
([S1, C] tensors: a handful of tiny ops).

Pass 2 (`_soft_kernel`), grid (C/BM, H/BH, S2): soft[rows, hcols] = sum over the program's V-tiles
of exp(m_tile - lse) * (q_tile @ E[tile, hcols]), an ordinary split-K matmul whose per-(row, tile)
scale is applied to the fp32 dot result; the S2 partial sums are added in torch (fixed order, no
atomics, deterministic).

Why E is streamed twice rather than once: the soft embedding of a row needs an [H] accumulator and
its scores need a full-H reduction first. A single pass would have to keep a [BM, H] fp32
accumulator per program (BM * 11 KiB at H = 2816: 704 KiB for BM = 64, against 256 KiB of
registers per SM, and Triton has no shared-memory accumulators), or split H across programs and
recompute the full-H scores in each (x H/BH = 22 the score FLOPs), or read-modify-write a global
accumulator per V-tile (BM * H * 8 bytes per tile, several times E's own traffic). Two passes
instead read E twice, 2 x 1.48 GB. At C = 256 both passes are compute-bound on an H200 anyway
(pass 1: 2*C*V*H = 378 GFLOP over 1.48 GB of E, 256 FLOP/B against a ridge of ~200 FLOP/B;
pass 2 the same FLOPs), so the second stream of E costs little on top of FLOPs every scheme pays.

Bytes per call at the real shape (bf16 E): E 2 x 1.48 GB, q written and read 2 x 134 MB (each
q tile is read by the H/BH programs of its row block, in step, so mostly from L2), logits 268 MB
written when asked for, x (1.4 MB) and the [S, C] partials negligible. FLOPs: 2 x 378 GFLOP of
dot, C*V (67 M) softcaps and exps. The unfused torch sequence reads E twice too, but adds about a
dozen passes over [C, V] fp32 temporaries (~4-5 GB: the .float(), tanh, scaling, softmax,
argmax, entropy and bf16 cast) and as many launches.

Only long-standing `tl` ops are used (load/store, dot, exp, log, where, max/min/sum, arange) so
the same code runs on Triton 3.6 (GPU) and under TRITON_INTERPRET=1 on CPU. tanh is not a
`tl` op in every version: `_tanh` uses (1 - e^-2|z|)/(1 + e^-2|z|) with the sign restored, and an
odd Taylor polynomial below |z| = 0.25 where that quotient would cancel (abs. error < 1e-7).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .qmatmul import dot_f32

# dtype codes for `_round_to` (constexpr ints: plainer than passing dtypes into jit helpers)
_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class VocabOut(NamedTuple):
    logits: torch.Tensor | None   # [C, V] fp32 softcapped (tempered if asked), or None
    argmax: torch.Tensor          # [C] int64 argmax of logits / tau (lowest index on ties)
    lse: torch.Tensor             # [C] fp32 logsumexp of logits / tau
    entropy: torch.Tensor         # [C] fp32 entropy (nats) of softmax(logits / tau)
    soft: torch.Tensor            # [C, H] fp32 softmax(logits / tau).to(E.dtype) @ E


def vocab_head_torch(x: torch.Tensor, E: torch.Tensor, cap: float | None, temperature: float, *,
                     write_logits: bool = True, tempered_logits: bool = False) -> VocabOut:
    """The unfused torch sequence of model.denoise + generation._denoise_canvas (the oracle)."""
    logits = (x.to(E.dtype) @ E.t()).float()                          # [C, V]
    if cap:
        logits = cap * torch.tanh(logits / cap)
    l = logits / temperature
    probs = torch.softmax(l, dim=-1)                                   # [C, V]
    argmax = l.argmax(dim=-1)
    lse = torch.logsumexp(l, dim=-1)
    entropy = torch.special.entr(probs).sum(dim=-1)
    soft = (probs.to(E.dtype) @ E).float()                             # [C, H]
    out = (l if tempered_logits else logits) if write_logits else None
    return VocabOut(out, argmax, lse, entropy, soft)


@triton.jit
def _tanh(z):
    az = tl.abs(z)
    e = tl.exp(-2.0 * az)
    big = (1.0 - e) / (1.0 + e)
    z2 = az * az
    # tanh z = z - z^3/3 + 2z^5/15 - 17z^7/315 + 62z^9/2835 - ...; next term < 2e-9 at |z| = 0.25
    small = az * (1.0 + z2 * (-0.3333333333333333 + z2 * (0.13333333333333333 + z2 * (
        -0.05396825396825397 + z2 * 0.021869488536155203))))
    th = tl.where(az < 0.25, small, big)
    return tl.where(z < 0, -th, th)


@triton.jit
def _round_to(v, DT: tl.constexpr):
    """fp32 v rounded to dtype code DT (see _DT; nearest, ties to even), returned as fp32. bf16 by
    bit arithmetic: the interpreter's fp32 -> bf16 cast truncates (Triton 3.9), the GPU's rounds."""
    if DT == 1:
        b = v.to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        return b.to(tl.float32, bitcast=True)
    elif DT == 2:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr):
    """a @ b with fp32 accumulation. DOT_F32: exact fp32 product (fp32 inputs, and the
    interpreter, whose bf16 dot is broken in Triton 3.9); the operands are already rounded."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _stats_kernel(x_ptr, e_ptr, logits_ptr, q_ptr, tmax_ptr, pm_ptr, ps_ptr, pt_ptr, pa_ptr,
                  C, V, H, stride_x, stride_e, stride_l, stride_q, stride_tm,
                  cap, tau, tiles_per_split, n_tiles,
                  BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, SOFTCAP: tl.constexpr,
                  WRITE_LOGITS: tl.constexpr, TEMPERED: tl.constexpr, DOT_F32: tl.constexpr,
                  XDT: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)                         # [BM] canvas rows
    rmask = rows < C
    rows64 = rows.to(tl.int64)
    xrow = x_ptr + rows64[:, None] * stride_x
    m = tl.full((BM,), -1.0e30, tl.float32)     # finite: (m_old - m_new) * s stays 0, not nan
    s = tl.zeros((BM,), tl.float32)
    t = tl.zeros((BM,), tl.float32)
    arg = tl.zeros((BM,), tl.int32)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    for tile in range(t0, t1):
        cols = tile * BV + tl.arange(0, BV)                      # [BV] vocabulary rows
        cmask = cols < V
        erow = e_ptr + cols.to(tl.int64)[:, None] * stride_e
        acc = tl.zeros((BM, BV), tl.float32)
        for k0 in range(0, H, BK):
            k = k0 + tl.arange(0, BK)
            km = k < H
            xt = tl.load(xrow + k[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
            et = tl.load(erow + k[None, :], mask=cmask[:, None] & km[None, :], other=0.0)
            acc += _dot(xt, tl.trans(et), DOT_F32)
        # round to the activation dtype as torch's matmul output is, then softcap in fp32
        logit = _round_to(acc, XDT)
        if SOFTCAP:
            logit = cap * _tanh(logit / cap)
        l = logit / tau
        omask = rmask[:, None] & cmask[None, :]
        if WRITE_LOGITS:
            lptr = logits_ptr + rows64[:, None] * stride_l + cols[None, :]
            if TEMPERED:
                tl.store(lptr, l, mask=omask)
            else:
                tl.store(lptr, logit, mask=omask)
        l = tl.where(cmask[None, :], l, float("-inf"))
        tmx = tl.max(l, axis=1)                                  # finite: a tile has a valid col
        tidx = tl.min(tl.where(l == tmx[:, None], cols[None, :], 2147483647), axis=1)
        m_new = tl.maximum(m, tmx)
        arg = tl.where(tmx > m, tidx, arg)                       # strict: earlier index wins ties
        alpha = tl.exp(m - m_new)
        d = tl.where(cmask[None, :], l - m_new[:, None], 0.0)
        p = tl.where(cmask[None, :], tl.exp(d), 0.0)
        t = alpha * (t + (m - m_new) * s) + tl.sum(p * d, axis=1)
        s = alpha * s + tl.sum(p, axis=1)
        m = m_new
        tl.store(q_ptr + rows64[:, None] * stride_q + cols[None, :],
                 _round_to(p, XDT).to(q_ptr.dtype.element_ty), mask=omask)
        tl.store(tmax_ptr + rows64 * stride_tm + tile, m, mask=rmask)
    poff = pid_s * C + rows
    tl.store(pm_ptr + poff, m, mask=rmask)
    tl.store(ps_ptr + poff, s, mask=rmask)
    tl.store(pt_ptr + poff, t, mask=rmask)
    tl.store(pa_ptr + poff, arg, mask=rmask)


@triton.jit
def _soft_kernel(q_ptr, e_ptr, tmax_ptr, lse_ptr, part_ptr, C, V, H,
                 stride_q, stride_e, stride_tm, tiles_per_split, n_tiles,
                 BM: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < C
    rows64 = rows.to(tl.int64)
    hcols = pid_h * BH + tl.arange(0, BH)
    hmask = hcols < H
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    acc = tl.zeros((BM, BH), tl.float32)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    for tile in range(t0, t1):
        cols = tile * BV + tl.arange(0, BV)
        cmask = cols < V
        q = tl.load(q_ptr + rows64[:, None] * stride_q + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0)           # [BM, BV]
        et = tl.load(e_ptr + cols.to(tl.int64)[:, None] * stride_e + hcols[None, :],
                     mask=cmask[:, None] & hmask[None, :], other=0.0)          # [BV, BH]
        f = tl.exp(tl.load(tmax_ptr + rows64 * stride_tm + tile, mask=rmask, other=0.0) - lse)
        acc += f[:, None] * _dot(q, et, DOT_F32)
    tl.store(part_ptr + (pid_s * C + rows64)[:, None] * H + hcols[None, :], acc,
             mask=rmask[:, None] & hmask[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _splits(n_tiles: int, want: int) -> tuple[int, int]:
    """(splits, tiles per split) with every split non-empty."""
    per = triton.cdiv(n_tiles, max(1, min(want, n_tiles)))
    return triton.cdiv(n_tiles, per), per


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def vocab_head(x: torch.Tensor, E: torch.Tensor, cap: float | None, temperature: float, *,
               write_logits: bool = True, tempered_logits: bool = False,
               block_m: int | None = None, block_v: int | None = None, block_k: int | None = None,
               block_h: int | None = None, splits: int | None = None, splits2: int | None = None,
               num_warps: int | None = None, num_stages: int | None = None) -> VocabOut:
    """Fused `vocab_head_torch`: x [C, H] and E [V, H] of one dtype (bf16/fp16/fp32), cap the
    softcap (None or 0: none), temperature > 0. `write_logits` stores the [C, V] fp32 logits
    (divided by the temperature if `tempered_logits`); without it they never reach memory.
    The block/split/warp arguments override the defaults (for benchmarks and tests)."""
    assert x.dim() == 2 and E.dim() == 2 and x.shape[1] == E.shape[1], \
        f"x {tuple(x.shape)} and E {tuple(E.shape)} do not match"
    assert x.dtype == E.dtype and E.dtype in (torch.bfloat16, torch.float16, torch.float32), \
        f"x and E must share a float dtype, got {x.dtype} and {E.dtype}"
    assert x.device == E.device, "x and E must be on one device"
    assert temperature > 0, "temperature must be positive"
    x, E = x.contiguous(), E.contiguous()
    C, H = x.shape
    V = E.shape[0]
    dev = x.device
    logits = torch.empty((C, V), dtype=torch.float32, device=dev) if write_logits else None
    if C == 0:
        z = torch.empty(0, dtype=torch.float32, device=dev)
        return VocabOut(logits, torch.empty(0, dtype=torch.int64, device=dev), z, z,
                        torch.empty((0, H), dtype=torch.float32, device=dev))
    tiny = _interpreting() or dev.type != "cuda"
    # GPU defaults (untuned; `scripts/bench.py --kernels-only --sweep` tries others): a
    # compile-only sm_90 build (ptxas) spilled least with BV = 64 for both kernels
    bm = block_m or (16 if tiny else (64 if C <= 64 else 128))
    bv = block_v or 64
    bk = block_k or (32 if tiny else 64)
    bh = block_h or (32 if tiny else 128)
    nw = num_warps or 8
    ns = num_stages or 3
    n_tiles = triton.cdiv(V, bv)
    mb = triton.cdiv(C, bm)
    target = _target_programs(dev)
    s1, per1 = _splits(n_tiles, splits or max(1, target // mb))
    hb = triton.cdiv(H, bh)
    s2, per2 = _splits(n_tiles, splits2 or max(1, target // (mb * hb)))
    q = torch.empty((C, V), dtype=E.dtype, device=dev)                 # exp(l - m_tile)
    tmax = torch.empty((C, n_tiles), dtype=torch.float32, device=dev)   # m after each tile
    pm, ps, pt = (torch.empty((s1, C), dtype=torch.float32, device=dev) for _ in range(3))
    pa = torch.empty((s1, C), dtype=torch.int32, device=dev)
    f32 = dot_f32(x)
    lg = logits if write_logits else q                                  # unused when not written
    _stats_kernel[(mb, s1)](
        x, E, lg, q, tmax, pm, ps, pt, pa, C, V, H, x.stride(0), E.stride(0), lg.stride(0),
        q.stride(0), tmax.stride(0), float(cap or 1.0), float(temperature), per1, n_tiles,
        BM=bm, BV=bv, BK=bk, SOFTCAP=bool(cap), WRITE_LOGITS=write_logits,
        TEMPERED=tempered_logits, DOT_F32=f32, XDT=_DT[x.dtype], num_warps=nw, num_stages=ns)
    # merge the S1 partial statistics (the earliest split holding the max has the lowest index)
    M = pm.max(dim=0).values                                            # [C]
    first = (pm == M).to(torch.int32).argmax(dim=0)                     # [C]
    argmax = pa.gather(0, first[None]).squeeze(0).long()
    w = torch.exp(pm - M)
    S = (w * ps).sum(dim=0)
    T = (w * (pt + (pm - M) * ps)).sum(dim=0)
    logS = torch.log(S)
    lse = M + logS
    entropy = (logS - T / S).clamp_min(0.0)
    part = torch.empty((s2, C, H), dtype=torch.float32, device=dev)
    _soft_kernel[(mb, hb, s2)](
        q, E, tmax, lse, part, C, V, H, q.stride(0), E.stride(0), tmax.stride(0), per2, n_tiles,
        BM=bm, BV=bv, BH=bh, DOT_F32=f32, num_warps=nw, num_stages=ns)
    soft = part[0] if s2 == 1 else part.sum(dim=0)
    return VocabOut(logits, argmax, lse, entropy, soft)
